"""Fine-tune (or train from scratch) a ViT with the official recipe, on any number of processes.

    accelerate launch -m vit_hf.finetune recipes/cifar10.json
    accelerate launch -m vit_hf.finetune recipes/cifar10.json --set train.micro_batch_size=32 --resume auto
    torchrun --nproc-per-node 8 -m vit_hf.finetune recipes/cifar10.json
    python -m vit_hf.finetune recipes/cifar10_cpu.json

SGD with momentum, warmup then cosine (or linear) decay stepped once per optimizer update, clipping of the
synchronised gradients, gradient accumulation up to `train.global_batch_size`; evaluation on minival every
`train.eval_every` updates; the best model on minival is exported into `output.dir` with `results.json`.
"""

import argparse
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    TorchDynamoPlugin,
    set_seed,
)
from tqdm.auto import tqdm
from transformers import ViTForImageClassification, get_scheduler

from vit_hf.attention import attention_rollout, pixels_to_images, prediction_grid, rollout_figure
from vit_hf.augment import mixup_cutmix, rand_augment, random_erasing, trivial_augment
from vit_hf.data import DeviceTransform, load_splits, make_loader, to_model_range
from vit_hf.errors import RunError, UserError, cli_entry
from vit_hf.evaluation import evaluate_split, gloo_on_cpu
from vit_hf.export import save_model_dir, write_model_files
from vit_hf.hub import push_to_hub, write_model_card
from vit_hf.model import build_model
from vit_hf.recipe import accumulation_steps, load_recipe


class Progress:
    """Where the run stands; saved in every checkpoint (through `register_for_checkpointing`)."""

    def __init__(self) -> None:
        self.step = 0  # optimizer updates done
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of this process consumed in the current epoch
        self.best_accuracy = -1.0
        self.best_step = 0
        self.skipped_updates = 0  # fp16 steps the gradient scaler skipped
        self.skipped_images = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


# ----------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(model: torch.nn.Module, optim: dict) -> torch.optim.Optimizer:
    """SGD with momentum (the official recipe) or AdamW; no weight decay on biases, norms and embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exempt = param.ndim <= 1 or name.endswith(("position_embeddings", "cls_token"))
        (no_decay if exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optim["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = {"fused": True} if torch.cuda.is_available() else {"foreach": True}
    if optim["name"] == "sgd":
        return torch.optim.SGD(groups, lr=optim["lr"], momentum=optim["momentum"], nesterov=optim["nesterov"], **fused)
    return torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), **fused)


def make_schedule(optimizer: torch.optim.Optimizer, schedule: dict) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then cosine or linear decay to 0 at `total_steps`, as `vit_jax.utils`.

    lr(step) = base * min(1, step / warmup) * decay(progress), progress = (step - warmup) / (total - warmup).
    """
    return get_scheduler(
        schedule["name"],
        optimizer,
        num_warmup_steps=schedule["warmup_steps"],
        num_training_steps=schedule["total_steps"],
    )


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The complete checkpoint with the highest step (incomplete ones keep a temporary name)."""
    steps = [(int(p.name.split("_")[1]), p) for p in checkpoints.glob("step_*") if p.name.split("_")[1].isdigit()]
    return max(steps)[1] if steps else None


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, keep: int, generator: torch.Generator) -> Path:
    """The full state into checkpoints/step_N: written under a temporary name, renamed when complete."""
    checkpoints = out / "checkpoints"
    final, staging = checkpoints / f"step_{step}", checkpoints / f".step_{step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    torch.save(generator.get_state(), staging / f"augment_rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        old = sorted((p for p in checkpoints.glob("step_*") if p != final), key=lambda p: int(p.name.split("_")[1]))
        for path in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final


def resume_from(accelerator: Accelerator, path: Path, generator: torch.Generator) -> None:
    accelerator.load_state(str(path))
    rng = path / f"augment_rng_{accelerator.process_index}.pt"
    if rng.exists():
        generator.set_state(torch.load(rng))


# ----------------------------------------------------------------------------------------------------------
# Training inputs


class TrainInputs:
    """Turns a uint8 micro-batch into model inputs and targets with the recipe's augmentation, on the device.

    Order: crop/resize/flip -> RandAugment or TrivialAugment on [0, 1] -> [-1, 1] -> random erasing -> Mixup or
    CutMix (soft targets). With none of the extras this is exactly the official training transform.
    """

    def __init__(self, recipe: dict, num_classes: int, generator: torch.Generator) -> None:
        self.augment = recipe["data"]["augment"] or {}
        self.generator = generator
        self.num_classes = num_classes
        self.label_smoothing = recipe["train"]["label_smoothing"]
        self.transform = DeviceTransform(
            recipe["model"]["image_size"],
            train=True,
            crop_scale=self.augment.get("crop_scale"),
            hflip=self.augment.get("hflip", False),
        )

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        augment, generator = self.augment, self.generator
        if augment.get("rand_augment") or augment.get("trivial_augment"):
            images = self.transform.geometry(batch["pixels"], generator)
            if augment.get("rand_augment"):
                images = rand_augment(images, **augment["rand_augment"], generator=generator)
            else:
                images = trivial_augment(images, generator=generator)
            images = to_model_range(images)
        else:
            images = self.transform(batch["pixels"], generator)
        if augment.get("random_erasing"):
            images = random_erasing(images, augment["random_erasing"], generator=generator)
        if augment.get("mixup_alpha") or augment.get("cutmix_alpha"):
            return mixup_cutmix(
                images,
                batch["labels"],
                self.num_classes,
                mixup_alpha=augment["mixup_alpha"],
                cutmix_alpha=augment["cutmix_alpha"],
                prob=augment["mix_prob"],
                switch_prob=augment["switch_prob"],
                label_smoothing=self.label_smoothing,
                generator=generator,
            )
        return images, batch["labels"]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, the mean over the micro-batch; soft targets already carry the label smoothing."""
        if targets.ndim == 2:
            return F.cross_entropy(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)


# ----------------------------------------------------------------------------------------------------------
# The run


class _StopFlags:
    """SIGTERM and Ctrl-C ask the loop to save and stop at the next update boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum


def _write_json(path: Path, value: dict) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(staging, path)


def run(recipe: dict, resume: str | None = None) -> dict:
    """Train as RECIPE says; returns the results (also written to output.dir/results.json)."""
    started = time.perf_counter()
    train_cfg, data_cfg = recipe["train"], recipe["data"]
    out = Path(recipe["output"]["dir"])
    seed = train_cfg["seed"]

    # ---- Processes, precision, accumulation ---------------------------------------------------------------
    cpu_processes = gloo_on_cpu()
    accumulation = accumulation_steps(recipe, PartialState(cpu=cpu_processes).num_processes)
    accelerator = Accelerator(
        cpu=cpu_processes,
        mixed_precision=train_cfg["mixed_precision"],
        # The data is one endless stream, as the official input pipeline: windows may span epochs.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed, non_blocking=True),
        step_scheduler_with_optimizer=False,  # the schedule is a function of the update count only
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out)),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if train_cfg["compile"] else None,
    )
    checkpoints = out / "checkpoints"
    if resume == "auto":
        resume_path = latest_checkpoint(checkpoints)
    elif resume is not None:
        resume_path = Path(resume)
        if not (resume_path / "custom_checkpoint_0.pkl").exists():
            raise UserError(f"--resume {resume}: not a checkpoint folder of this project")
    else:
        resume_path = None
        if latest_checkpoint(checkpoints) is not None:
            raise UserError(f"output.dir {out} already holds checkpoints: pass --resume auto, or choose another dir")
    set_seed(seed)

    # ---- Input pipeline ------------------------------------------------------------------------------------
    with accelerator.main_process_first():
        splits = load_splits(data_cfg)
        model = build_model(recipe["model"], splits.class_names)
    image_size = recipe["model"]["image_size"]

    def loader(dataset, batch_size, train):
        return make_loader(
            dataset, splits.image_column, splits.label_column, batch_size,
            shuffle=train, seed=seed, num_workers=data_cfg["num_workers"], drop_last=train,
            bad_images=data_cfg["bad_images"], image_size=image_size,
        )  # fmt: skip

    train_loader = loader(splits.train, train_cfg["micro_batch_size"], train=True)
    if len(train_loader) < accelerator.num_processes:
        raise UserError(
            f"data.train_split: {len(splits.train)} images do not fill one micro-batch of "
            f"{train_cfg['micro_batch_size']} on each of {accelerator.num_processes} processes"
        )
    eval_loaders = {
        name: loader(dataset, train_cfg["eval_batch_size"], train=False)
        for name, dataset in (("eval", splits.eval), ("test", splits.test))
        if dataset is not None
    }
    eval_transform = DeviceTransform(image_size, train=False)

    # ---- Model, optimizer, schedule ------------------------------------------------------------------------
    optimizer = make_optimizer(model, recipe["optim"])
    scheduler = make_schedule(optimizer, recipe["schedule"])
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {name: accelerator.prepare(dl) for name, dl in eval_loaders.items()}
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    generator = torch.Generator(device=accelerator.device).manual_seed(seed * 1_000_003 + accelerator.process_index)
    inputs = TrainInputs(recipe, len(splits.class_names), generator)

    # ---- Checkpoint ----------------------------------------------------------------------------------------
    if resume_path is not None:
        resume_from(accelerator, resume_path, generator)
        accelerator.print(f"resumed from {resume_path} at step {progress.step}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "recipe.json", recipe)
    accelerator.init_trackers("runs")
    train_log = _TrainLog(out / "train_log.jsonl", progress.step, accelerator.is_main_process)

    # ---- Evaluation ----------------------------------------------------------------------------------------
    def run_eval(name: str) -> dict:
        result = evaluate_split(model, eval_loaders[name], eval_transform, accelerator)
        accelerator.log({f"{name}/accuracy": result["accuracy"], f"{name}/loss": result["loss_mean"]}, progress.step)
        return result

    def evaluate_and_keep_best() -> None:
        result = run_eval("eval")
        if result["accuracy"] > progress.best_accuracy:
            progress.best_accuracy, progress.best_step = result["accuracy"], progress.step
            state = accelerator.get_state_dict(model)  # a collective under FSDP: every process takes part
            if accelerator.is_main_process:
                save_model_dir(accelerator.unwrap_model(model), checkpoints / "best", state_dict=state)
        accelerator.wait_for_everyone()
        bar.set_postfix(eval_acc=f"{result['accuracy']:.4f}", refresh=False)

    # ---- Train loop ----------------------------------------------------------------------------------------
    schedule = recipe["schedule"]
    total = schedule["total_steps"]
    stop = _StopFlags()
    stream = _micro_batches(accelerator, train_loader, progress)
    max_norm = recipe["optim"]["max_grad_norm"] or math.inf
    window = _Window(accelerator.device)
    first_step, train_started = progress.step, time.perf_counter()
    last_saved = progress.step if resume_path is not None else -1
    model.train()
    with tqdm(total=total, initial=progress.step, desc="train", disable=not accelerator.is_main_process) as bar:
        while progress.step < total:
            for _ in range(accumulation):
                waited = time.perf_counter()
                batch = next(stream)
                window.data_seconds += time.perf_counter() - waited
                with accelerator.accumulate(model):
                    images, targets = inputs(batch)
                    logits = model(pixel_values=images).logits.float()
                    loss = inputs.loss(logits, targets)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        window.grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window.add_micro(loss.detach(), batch["skipped"])
            if accelerator.scaler is not None and accelerator.optimizer_step_was_skipped:
                progress.skipped_updates += 1
            window.end_update(scheduler.get_last_lr()[0])
            scheduler.step()
            progress.step += 1
            bar.update(1)

            step = progress.step
            log_now = step % train_cfg["log_every"] == 0 or step == total
            save_now = step % train_cfg["save_every"] == 0
            eval_now = "eval" in eval_loaders and (step % train_cfg["eval_every"] == 0 or step == total)
            if log_now or save_now or eval_now:
                report = window.reduce(accelerator, stop.signal is not None, train_cfg["global_batch_size"])
                progress.skipped_images += report["skipped_images"]
                if report["nonfinite"]:
                    last = latest_checkpoint(checkpoints)
                    raise RunError(
                        f"the training loss became NaN or infinite by step {step}; the last good checkpoint is "
                        f"{last or 'none'}: lower optim.lr or check the data, then resume with --resume auto"
                    )
                train_log.write(report, step - len(report["losses"]) + 1, accelerator)
                bar.set_postfix(loss=f"{report['losses'][-1]:.4f}", lr=f"{report['lr']:.2e}", refresh=False)
                if eval_now:
                    evaluate_and_keep_best()
                if save_now or report["stop"]:
                    save_checkpoint(accelerator, out, step, train_cfg["keep_checkpoints"], generator)
                    last_saved = step
                if report["stop"]:
                    accelerator.end_training()
                    accelerator.print(f"stopped at step {step}; checkpoint saved; continue with --resume auto")
                    raise SystemExit(128 + (stop.signal or signal.SIGTERM))
    if last_saved != total:
        save_checkpoint(accelerator, out, total, train_cfg["keep_checkpoints"], generator)
    train_seconds = time.perf_counter() - train_started

    # ---- Export and test -----------------------------------------------------------------------------------
    unwrapped = accelerator.unwrap_model(model)
    if "eval" in eval_loaders and (checkpoints / "best" / "model.safetensors").exists():
        best = ViTForImageClassification.from_pretrained(checkpoints / "best")
        unwrapped.load_state_dict(best.state_dict())
    results = {
        "step": progress.step,
        "best_step": progress.best_step if "eval" in eval_loaders else progress.step,
        "eval_accuracy": None,
        "eval_loss": None,
        "eval_samples": 0,
        "test_accuracy": None,
        "test_loss": None,
        "test_samples": 0,
    }
    for name in eval_loaders:
        result = run_eval(name)
        results |= {
            f"{name}_accuracy": result["accuracy"],
            f"{name}_loss": result["loss_mean"],
            f"{name}_samples": result["samples"],
        }
    images_seen = progress.step * train_cfg["global_batch_size"]
    results |= {
        "images_seen": images_seen,
        # This session's updates only: a resumed run did the others earlier.
        "train_samples_per_second": (progress.step - first_step) * train_cfg["global_batch_size"] / train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "skipped_updates": progress.skipped_updates,
        "skipped_images": progress.skipped_images,
        "num_processes": accelerator.num_processes,
        "hardware": _hardware(accelerator),
        "mixed_precision": train_cfg["mixed_precision"],
        "base_model": recipe["model"]["pretrained"],
        "dataset": splits.name,
        "class_names": splits.class_names,
    }
    if accelerator.is_main_process:
        _export(unwrapped, out)
        _write_json(out / "results.json", results)
        _log_pictures(accelerator, unwrapped, splits, eval_transform)
        write_model_card(out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    hub = recipe["hub"]
    if hub["push"] and accelerator.is_main_process:
        accelerator.print(f"pushed: {push_to_hub(out, hub['model_id'], private=hub['private'])}")
    accelerator.print(json.dumps({k: v for k, v in results.items() if k != "class_names"}))
    return results


def _micro_batches(accelerator: Accelerator, loader, progress: Progress):
    """An endless stream of this process's micro-batches, resumable mid-epoch from `progress`."""
    while True:
        loader.set_epoch(progress.epoch)  # the shuffle of epoch e depends on (seed, e) only
        skip = progress.batches_in_epoch
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            progress.batches_in_epoch += 1
            yield batch
        progress.epoch += 1
        progress.batches_in_epoch = 0


class _Window:
    """Per-update figures kept on the device between log steps, so the step never waits on the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.grad_norm = torch.zeros((), device=device)
        self._reset()

    def _reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.micro: list[torch.Tensor] = []
        self.skipped = torch.zeros((), device=self.device, dtype=torch.long)
        self.nonfinite = torch.zeros((), device=self.device, dtype=torch.bool)
        self.data_seconds = 0.0
        self.started = time.perf_counter()

    def add_micro(self, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        self.micro.append(loss)
        self.skipped += skipped.to(self.device)
        self.nonfinite |= ~torch.isfinite(loss)

    def end_update(self, lr: float) -> None:
        self.losses.append(torch.stack(self.micro).mean())
        self.grad_norms.append(torch.as_tensor(self.grad_norm, device=self.device, dtype=torch.float32))
        self.lrs.append(lr)
        self.micro = []

    def reduce(self, accelerator: Accelerator, stop: bool, global_batch: int) -> dict:
        """One collective for the whole window: losses averaged over processes, flags and counts combined."""
        flags = torch.stack([self.nonfinite.float(), torch.tensor(float(stop), device=self.device)])
        packed = torch.cat([torch.stack(self.losses), flags * 1e9, self.skipped.float().view(1)])
        packed = accelerator.reduce(packed, "sum") if accelerator.num_processes > 1 else packed
        n = len(self.losses)
        values = packed.tolist()  # waits for the device: the window's time includes its queued work
        seconds = time.perf_counter() - self.started
        report = {
            "losses": [v / accelerator.num_processes for v in values[:n]],
            "nonfinite": values[n] > 0 or not all(math.isfinite(v) for v in values[:n]),
            "stop": values[n + 1] > 0,
            "skipped_images": int(values[n + 2]),
            "grad_norms": torch.stack(self.grad_norms).tolist(),
            "lrs": self.lrs,
            "lr": self.lrs[-1],
            "images_per_second": n * global_batch / seconds,
            "data_wait_share": self.data_seconds / seconds,
        }
        self._reset()
        return report


class _TrainLog:
    """Per-update figures to TensorBoard and to train_log.jsonl (main process), continued on resume."""

    def __init__(self, path: Path, resumed_step: int, is_main: bool) -> None:
        self.path, self.is_main = path, is_main
        if is_main and path.exists():  # drop updates after the checkpoint we resume from: they are redone
            lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resumed_step]
            path.write_text("".join(line + "\n" for line in lines))

    def write(self, report: dict, first_step: int, accelerator: Accelerator) -> None:
        if not self.is_main:
            return
        rows = []
        for i, (loss, grad_norm, lr) in enumerate(
            zip(report["losses"], report["grad_norms"], report["lrs"], strict=True)
        ):
            step = first_step + i
            accelerator.log({"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr}, step=step)
            rows.append(json.dumps({"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr}))
        last = first_step + len(rows) - 1
        speed = {
            "train/images_per_second": report["images_per_second"],
            "train/data_wait_share": report["data_wait_share"],
        }
        accelerator.log(speed, step=last)
        with open(self.path, "a") as file:
            file.write("".join(row + "\n" for row in rows))


def _log_pictures(accelerator: Accelerator, model, splits, transform, count: int = 16) -> None:
    """A grid of predictions and a few attention rollouts on the first test (or minival) images, to TensorBoard."""
    dataset = splits.test if splits.test is not None else splits.eval
    if dataset is None:
        return
    rows = dataset.select(range(min(count, len(dataset))))
    batch = next(iter(make_loader(rows, splits.image_column, splits.label_column, len(rows), shuffle=False)))
    pixels = transform(batch["pixels"].to(accelerator.device))
    with torch.inference_mode():
        predictions = model(pixel_values=pixels).logits.argmax(-1).cpu()
    images = pixels_to_images(pixels)
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    grid = prediction_grid(images, batch["labels"].tolist(), predictions.tolist(), splits.class_names)
    writer.add_image("test/predictions", grid, global_step=0, dataformats="HWC")
    maps = attention_rollout(model, pixels[:4])
    for i in range(len(maps)):
        title = f"predicted {splits.class_names[predictions[i]]}"
        writer.add_figure(f"test/attention_rollout_{i}", rollout_figure(images[i], maps[i], title), global_step=0)


def _hardware(accelerator: Accelerator) -> str:
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    return f"{accelerator.num_processes}x {name}"


def _export(model, out: Path) -> None:
    """The model files into OUT, each replaced atomically (OUT also holds runs/ and checkpoints/)."""
    staging = out / ".export.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    write_model_files(model, staging)
    for path in staging.iterdir():
        os.replace(path, out / path.name)
    staging.rmdir()


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vit_hf.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a JSON recipe, e.g. recipes/cifar10.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE", help="override a field")
    parser.add_argument("--resume", help="'auto' (the latest checkpoint in output.dir) or a checkpoint folder")
    args = parser.parse_args(argv)
    run(load_recipe(args.recipe, args.set), resume=args.resume)


if __name__ == "__main__":
    main()
