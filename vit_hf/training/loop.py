"""Fine-tune (or train from scratch) a ViT with the official recipe, on any number of processes.

    accelerate launch -m vit_hf.finetune recipes/cifar10.json
    accelerate launch -m vit_hf.finetune recipes/cifar10.json --set train.micro_batch_size=32 --resume auto
    torchrun --nproc-per-node 8 -m vit_hf.finetune recipes/cifar10.json
    python -m vit_hf.finetune recipes/cifar10_cpu.json

SGD with momentum, warmup then cosine (or linear) decay stepped once per optimizer update, clipping of the
synchronised gradients, gradient accumulation up to `train.global_batch_size`; evaluation on minival every
`train.eval_every` updates; the best model on minival is exported into `output.dir` with `results.json`.

The run is one `FineTune` object in torchtune's recipe shape: `__init__` sets everything up, `train` runs the updates
(`update` is one accumulation window, in the order of a training step; `at_boundary` logs, evaluates, saves, stops),
and `finish` exports the best model, scores the test split and writes the card.
"""

import copy
import json
import logging
import math
import signal
import time
from pathlib import Path

import psutil
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    TorchDynamoPlugin,
    parse_flag_from_env,
    set_seed,
)
from tqdm.auto import tqdm

from vit_hf.data.inputs import TrainInputs
from vit_hf.data.sources import DeviceTransform, load_splits, make_loader
from vit_hf.data.streaming import StreamSplit, make_stream_loader
from vit_hf.models.build import build_model
from vit_hf.models.lora import add_lora, exportable
from vit_hf.models.stochastic_depth import add_stochastic_depth
from vit_hf.publish.hub import push_to_hub, write_model_card
from vit_hf.publish.model_dir import MODEL_FILES, load_model_dir, save_model_dir
from vit_hf.recipe import accumulation_steps
from vit_hf.training.checkpoint import Checkpointer, Progress, latest_checkpoint, resolve_resume, restart_store
from vit_hf.training.ema import WeightAverage
from vit_hf.training.evaluation import evaluate_split, gloo_on_cpu
from vit_hf.training.memory import find_micro_batch
from vit_hf.training.optim import make_optimizer, make_schedule
from vit_hf.training.run_log import RunLog, UpdateWindow
from vit_hf.utils.errors import RunError, UserError
from vit_hf.utils.files import atomic_files_into, link_or_copy, write_json

logger = logging.getLogger(__name__)


class StopSignals:
    """SIGTERM and Ctrl-C ask the loop to save and stop after the current update, on every process; `restore` gives
    the handlers back.

    A launcher or a scheduler may signal only some of the processes, and each must stop after the same update: the
    flag travels in a host collective over a gloo group of its own after every update, a few bytes on the network
    that never wait for the GPU (the training's collectives run on NCCL, its queue is left alone).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, processes: int) -> None:
        self.signal: int | None = None
        self._group = torch.distributed.new_group(backend="gloo") if processes > 1 else None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def requested(self) -> bool:
        """Whether any process has been signalled (the same answer on all of them)."""
        if self._group is None:
            return self.signal is not None
        flag = torch.tensor([self.signal or 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        # The answer is the reduced flag alone: a signal arriving after it was read here counts at the next update.
        agreed = int(flag)
        self.signal = self.signal or agreed or None
        return agreed != 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class FineTune:
    """One training run of a recipe: set up, train, finish."""

    def __init__(self, recipe: dict, resume: str | None = None) -> None:
        self.started = time.perf_counter()
        self.recipe = recipe = copy.deepcopy(recipe)  # "auto" fields are filled in below
        self.cfg = recipe["train"]
        self.out = Path(recipe["output"]["dir"])
        self.accelerator = accelerator = self._make_accelerator()
        resume_path = resolve_resume(self.out / "checkpoints", resume)
        set_seed(self.cfg["seed"])
        model = self._build_model(resume_path)
        train_loader = self._prepare(model)
        self.eval_transform = DeviceTransform(recipe["model"]["image_size"], train=False)
        # The augmentations' own generator on the device, one stream per process, saved in every checkpoint.
        seed = self.cfg["seed"] * 1_000_003 + accelerator.process_index
        generator = torch.Generator(accelerator.device).manual_seed(seed)
        self.inputs = TrainInputs(recipe, len(self.splits.class_names), generator)
        self.checkpointer = Checkpointer(accelerator, self.out / "checkpoints", self.cfg["keep_checkpoints"], generator)
        if resume_path is not None:
            epoch_batches = 0 if self.splits.streaming else len(train_loader)  # a stream has no length
            self.checkpointer.resume(resume_path, self.progress, recipe, epoch_batches)
            accelerator.print(f"resumed from {resume_path} at step {self.progress.step}")
        self.last_saved = self.progress.step if resume_path is not None else -1
        self.first_step = self.progress.step
        if accelerator.is_main_process:
            write_json(self.out / "recipe.json", recipe)
        accelerator.init_trackers("runs")
        self.log = RunLog(self.out, self.progress.step, accelerator)
        self.stream = self._micro_batches(train_loader)
        self.window = UpdateWindow(accelerator.device)
        self.max_norm = recipe["optim"]["max_grad_norm"] or math.inf

    def _build_model(self, resume_path: Path | None) -> torch.nn.Module:
        """The data set's splits, and the recipe's model on its classes: adapters, drop path, checkpointing, and the
        micro-batch found on it with "auto"."""
        recipe = self.recipe
        with self.accelerator.local_main_process_first():  # downloads land in a cache local to each machine
            self.splits = load_splits(recipe["data"], seed=self.cfg["seed"], streaming_ok=True)
            model = build_model(recipe["model"], self.splits.class_names)
        if recipe["model"]["lora"] is not None:  # before stochastic depth: its hooks go on the adapted layers
            model = add_lora(model, recipe["model"]["lora"])
        self.auto_micro_batch = self.cfg["micro_batch_size"] == "auto"
        if self.auto_micro_batch:
            self._choose_micro_batch(model, resume_path)
        if recipe["model"]["drop_path"]:
            add_stochastic_depth(model, recipe["model"]["drop_path"])
        if self.cfg["gradient_checkpointing"]:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _prepare(self, model: torch.nn.Module):
        """Model, optimizer, schedule and loaders through `accelerator.prepare`, and the state every checkpoint holds
        besides them (`Progress`, the weight average, a stream's position); the training loader."""
        accelerator = self.accelerator
        train_loader, self.eval_loaders = self._make_loaders()
        optimizer = make_optimizer(model, self.recipe["optim"])
        scheduler = make_schedule(optimizer, self.recipe["schedule"])
        if self.splits.streaming:  # streams split themselves across the processes (vit_hf.streaming), unprepared
            self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        else:
            self.model, self.optimizer, train_loader, self.scheduler = accelerator.prepare(
                model, optimizer, train_loader, scheduler
            )
            self.eval_loaders = {name: accelerator.prepare(loader) for name, loader in self.eval_loaders.items()}
        self.progress = Progress()
        accelerator.register_for_checkpointing(self.progress)
        self.ema = None
        if self.cfg["ema_decay"] is not None:
            self.ema = WeightAverage(accelerator.unwrap_model(self.model), self.cfg["ema_decay"])
            accelerator.register_for_checkpointing(self.ema)
        if self.splits.streaming:  # every process's stream position (the Progress data counters stay 0)
            accelerator.register_for_checkpointing(train_loader)
        return train_loader

    def _choose_micro_batch(self, model: torch.nn.Module, resume_path: Path | None) -> None:
        """`train.micro_batch_size: "auto"`: the first run's choice (in its recipe.json) on resume, else the largest
        that fits now; the accumulation follows, so the global batch is unchanged."""
        saved = self.out / "recipe.json"
        if resume_path is not None and saved.is_file():
            micro = json.loads(saved.read_text())["train"]["micro_batch_size"]
        else:
            micro = find_micro_batch(model, self.recipe, self.accelerator)
        self.cfg["micro_batch_size"] = micro
        self.accumulation = accumulation_steps(self.recipe, self.accelerator.num_processes)
        self.accelerator.gradient_accumulation_steps = self.accumulation
        self.accelerator.print(f"micro-batch {micro} x {self.accumulation} accumulation steps (auto)")

    def _make_accelerator(self) -> Accelerator:
        cpu_processes = gloo_on_cpu()
        processes = PartialState(cpu=cpu_processes, **restart_store()).num_processes
        # With "auto", the accumulation is set once the micro-batch is found (`_choose_micro_batch`).
        self.accumulation = 1 if self.cfg["micro_batch_size"] == "auto" else accumulation_steps(self.recipe, processes)
        accelerator = Accelerator(
            cpu=cpu_processes,
            mixed_precision=self.cfg["mixed_precision"],
            # The data is one endless stream, as the official input pipeline: windows may span epochs.
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=self.accumulation, sync_with_dataloader=False
            ),
            dataloader_config=DataLoaderConfiguration(
                use_seedable_sampler=True, data_seed=self.cfg["seed"], non_blocking=True
            ),
            step_scheduler_with_optimizer=False,  # the schedule is a function of the update count only
            log_with=self.cfg["report_to"],
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out)),
            dynamo_plugin=TorchDynamoPlugin(backend="inductor") if self.cfg["compile"] else None,
        )
        if cpu_processes and parse_flag_from_env("ACCELERATE_USE_FSDP"):
            _fsdp_on_cpu(accelerator)
        if accelerator.distributed_type == DistributedType.FSDP and self.cfg["ema_decay"] is not None:
            raise UserError(
                "train.ema_decay: the weight average keeps a whole copy of the model on every process, which FSDP "
                "exists to avoid: set it to null, or train with DDP"
            )
        return accelerator

    def _loader(self, dataset, batch_size: int, train: bool, workers: int | None = None):
        """Training batches carry the crop and flip settings: photos larger than the model are cropped in the
        workers (see `vit_hf.data`); evaluation batches are whole images. A streamed split (data.streaming) gets a
        `StreamLoader` of this process's part: evaluation ones even out the batch counts of the processes. WORKERS
        replaces data.num_workers (a batch or two read at once is quicker without starting worker processes)."""
        data, augment = self.recipe["data"], self.recipe["data"]["augment"] or {}
        workers = data["num_workers"] if workers is None else workers
        if self.splits.streaming and isinstance(dataset, StreamSplit):
            accelerator = self.accelerator
            return make_stream_loader(
                dataset, self.splits.image_column, self.splits.label_column, len(self.splits.class_names),
                batch_size, shuffle=train, seed=self.cfg["seed"], num_workers=workers,
                shuffle_buffer=data["shuffle_buffer"], bad_images=data["bad_images"],
                image_size=self.recipe["model"]["image_size"], crop_scale=augment.get("crop_scale") if train else None,
                hflip=train and augment.get("hflip", False), process_index=accelerator.process_index,
                num_processes=accelerator.num_processes, device=accelerator.device, even=not train,
            )  # fmt: skip
        return make_loader(
            dataset, self.splits.image_column, self.splits.label_column, batch_size,
            shuffle=train, seed=self.cfg["seed"], num_workers=workers, drop_last=train,
            bad_images=data["bad_images"], image_size=self.recipe["model"]["image_size"],
            crop_scale=augment.get("crop_scale") if train else None, hflip=train and augment.get("hflip", False),
        )  # fmt: skip

    def _make_loaders(self) -> tuple:
        splits, processes = self.splits, self.accelerator.num_processes
        train_loader = self._loader(splits.train, self.cfg["micro_batch_size"], train=True)
        if not splits.streaming and len(train_loader) < processes:  # a stream checks its parts as it reads them
            raise UserError(
                f"data.train_split: {len(splits.train)} images do not fill one micro-batch of "
                f"{self.cfg['micro_batch_size']} on each of {processes} processes"
            )
        evals = {"eval": splits.eval, "test": splits.test}
        return train_loader, {
            name: self._loader(dataset, self.cfg["eval_batch_size"], train=False)
            for name, dataset in evals.items()
            if dataset is not None
        }

    def _micro_batches(self, loader):
        """An endless stream of this process's micro-batches, resumable mid-epoch from `progress`.

        Process i takes micro-batches i, i + n, ... of the epoch's order: a micro-batch on each process is one stretch
        of the global sample stream, counted in `samples_in_epoch` too, which another process count can continue.
        """
        progress = self.progress
        if self.splits.streaming:
            # An epoch is one pass over this process's part of the stream; the position is the loader's own state.
            progress.epoch_samples = 0
            for batch in loader.endless():
                progress.epoch = loader.epoch
                yield batch
        batch_samples = self.cfg["micro_batch_size"] * self.accelerator.num_processes
        progress.epoch_samples = len(loader) * batch_samples
        while True:
            loader.set_epoch(progress.epoch)  # the shuffle of epoch e depends on (seed, e) only
            skip = progress.batches_in_epoch
            for batch in self.accelerator.skip_first_batches(loader, skip) if skip else loader:
                progress.batches_in_epoch += 1
                progress.samples_in_epoch += batch_samples
                yield batch
            progress.epoch += 1
            progress.batches_in_epoch = progress.samples_in_epoch = 0

    # ---- Train ---------------------------------------------------------------------------------------------

    def train(self) -> None:
        """Updates until `schedule.total_steps`; a signal saves a checkpoint and exits with 128 + its number."""
        total = self.recipe["schedule"]["total_steps"]
        self.stop = StopSignals(self.accelerator.num_processes)
        self.train_started = time.perf_counter()
        self.model.train()
        bar = tqdm(total=total, initial=self.progress.step, desc="train", disable=not self.accelerator.is_main_process)
        try:
            with bar:
                self.bar = bar
                while self.progress.step < total:
                    self.update()
                    self.at_boundary(last=self.progress.step == total)
        finally:
            self.stop.restore()
        self.train_seconds = time.perf_counter() - self.train_started

    def update(self) -> None:
        """One optimizer update: `accumulation` micro-batches, clipping on the last, then the schedule.

        Nothing here reads a device value on the host: the loss, the gradient norm and the flags stay on the device
        until the next log step.
        """
        accelerator, model, window = self.accelerator, self.model, self.window
        for _ in range(self.accumulation):
            waited = time.perf_counter()
            batch = next(self.stream)
            window.data_seconds += time.perf_counter() - waited
            with accelerator.accumulate(model):
                images, targets = self.inputs(batch)
                logits = model(pixel_values=images).logits.float()
                loss = self.inputs.loss(logits, targets)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    window.grad_norm = _local(accelerator.clip_grad_norm_(model.parameters(), self.max_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            window.add_micro(loss.detach(), batch["skipped"])
        if self.ema is not None:
            self.ema.update(accelerator.unwrap_model(model))
        if accelerator.scaler is not None and accelerator.optimizer_step_was_skipped:
            self.progress.skipped_updates += 1
        window.end_update(self.scheduler.get_last_lr()[0])
        self.scheduler.step()
        self.progress.step += 1
        self.bar.update(1)

    def at_boundary(self, last: bool) -> None:
        """After an update: log, evaluate, save and stop where the recipe or a signal asks, and stop on a NaN."""
        step, cfg = self.progress.step, self.cfg
        log_now = step % cfg["log_every"] == 0 or last
        save_now = step % cfg["save_every"] == 0
        eval_now = "eval" in self.eval_loaders and (step % cfg["eval_every"] == 0 or last)
        stop_requested = self.stop.requested()
        if not (log_now or save_now or eval_now or stop_requested):
            return
        report = self.window.reduce(self.accelerator, cfg["global_batch_size"])
        self.progress.skipped_images += report["skipped_images"]
        if report["nonfinite"]:
            raise RunError(
                f"the training loss became NaN or infinite by step {step}; the last good checkpoint is "
                f"{latest_checkpoint(self.checkpointer.dir) or 'none'}: lower optim.lr or check the data, "
                "then resume with --resume auto"
            )
        self.log.train(report, step - len(report["losses"]) + 1)
        self.bar.set_postfix(loss=f"{report['losses'][-1]:.4f}", lr=f"{report['lr']:.2e}", refresh=False)
        if eval_now:
            self.evaluate_and_keep_best()
        if save_now or stop_requested:
            self.save_checkpoint()
        if stop_requested:
            self.accelerator.end_training()
            self.accelerator.print(f"stopped at step {step}; checkpoint saved; continue with --resume auto")
            raise SystemExit(128 + self.stop.signal)

    def evaluate(self, split: str, model: torch.nn.Module, log_as: str | None = None) -> dict:
        """MODEL on the eval or test split, logged under LOG_AS (default: the split's name)."""
        with self.accelerator.autocast():
            result = evaluate_split(model, self.eval_loaders[split], self.eval_transform, self.accelerator)
        self.log.eval(log_as or split, self.progress.step, result["accuracy"], result["loss_mean"])
        return result

    def evaluate_and_keep_best(self) -> None:
        """Minival of the weights (and of their average, with EMA); a new best goes to checkpoints/best."""
        accuracy = {"raw": self.evaluate("eval", self.model)["accuracy"]}
        if self.ema is not None:
            accuracy["ema"] = self.evaluate("eval", self.ema.model, log_as="eval_ema")["accuracy"]
        weights = max(accuracy, key=accuracy.get)  # the raw weights on a tie: the first key
        progress = self.progress
        if accuracy[weights] > progress.best_accuracy:
            progress.best_accuracy, progress.best_step, progress.best_weights = (
                accuracy[weights],
                progress.step,
                weights,
            )
            self._save_model(self.checkpointer.dir / "best", ema=weights == "ema")
        self.bar.set_postfix(eval_acc=f"{accuracy['raw']:.4f}", refresh=False)

    def _save_model(self, folder: Path, ema: bool = False) -> None:
        """The training weights (gathered: a collective under FSDP, every process takes part), or their average."""
        accelerator = self.accelerator
        state = None if ema else accelerator.get_state_dict(self.model)
        state = state and {key.removeprefix("_orig_mod."): value for key, value in state.items()}  # train.compile
        if accelerator.is_main_process:
            model = self.ema.model if ema else accelerator.unwrap_model(self.model)
            model, state = exportable(model, state)  # LoRA merged: the model folder needs no peft
            save_model_dir(model, folder, state_dict=state)
        accelerator.wait_for_everyone()

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.progress.step)
        self.last_saved = self.progress.step

    # ---- Finish --------------------------------------------------------------------------------------------

    def finish(self) -> dict:
        """The final checkpoint, the exported model (the best on minival), the test score, results and card."""
        finish_started = time.perf_counter()
        accelerator, out = self.accelerator, self.out
        if self.last_saved != self.progress.step:
            self.save_checkpoint()
        best = self.checkpointer.dir / "best"
        if "eval" not in self.eval_loaders or not (best / "model.safetensors").exists():
            self._save_model(best)  # no minival: the last model is the one exported
        # Every process loads the exported model whole, so that scoring it needs no sharded state.
        model = load_model_dir(best).to(accelerator.device)
        results, evaluated = self._results(), {}
        for name in self.eval_loaders:
            # The exported model's minival score is logged apart: the minival curve stays that of the training weights.
            evaluated[name] = result = self.evaluate(name, model, log_as="eval_exported" if name == "eval" else name)
            results |= {f"{name}_{key}": result[key] for key in ("accuracy", "samples")}
            results[f"{name}_loss"] = result["loss_mean"]
        if accelerator.is_main_process:
            with atomic_files_into(out) as staging:
                for name in MODEL_FILES:
                    link_or_copy(best / name, staging / name)
            self._log_pictures(model, evaluated)
            results["wall_seconds"] = time.perf_counter() - self.started
            write_json(out / "results.json", results)
            write_model_card(out)
            results["finish_seconds"] = time.perf_counter() - finish_started
            write_json(out / "results.json", results)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        hub = self.recipe["hub"]
        if hub["push"] and accelerator.is_main_process:
            accelerator.print(f"pushed: {push_to_hub(out, hub['model_id'], private=hub['private'])}")
        accelerator.print(json.dumps({k: v for k, v in results.items() if k != "class_names"}))
        return results

    def _results(self) -> dict:
        progress, cfg, has_eval = self.progress, self.cfg, "eval" in self.eval_loaders
        updates = progress.step - self.first_step  # this session's: a resumed run did the others earlier
        parameters = list(self.accelerator.unwrap_model(self.model).parameters())
        return {
            "step": progress.step,
            "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
            "total_parameters": sum(p.numel() for p in parameters),
            # Under FSDP each process holds a shard: the main process's part of the parameters shows it.
            "main_process_parameters": sum(_local(p).numel() for p in parameters),
            "distributed": self.accelerator.distributed_type.value,
            "best_step": progress.best_step if has_eval else progress.step,
            "exported_weights": "ema average" if has_eval and progress.best_weights == "ema" else "trained",
            **{f"{split}_{key}": None for split in ("eval", "test") for key in ("accuracy", "loss")},
            "eval_samples": 0,
            "test_samples": 0,
            "images_seen": progress.step * cfg["global_batch_size"],
            "train_samples_per_second": updates * cfg["global_batch_size"] / self.train_seconds,
            "startup_seconds": self.train_started - _process_started_perf(),
            "skipped_updates": progress.skipped_updates,
            "skipped_images": progress.skipped_images,
            "num_processes": self.accelerator.num_processes,
            "micro_batch_size": cfg["micro_batch_size"],
            "micro_batch_size_auto": self.auto_micro_batch,
            "accumulation_steps": self.accumulation,
            "hardware": _hardware(self.accelerator),
            "mixed_precision": cfg["mixed_precision"],
            "base_model": self.recipe["model"]["pretrained"],
            "dataset": self.splits.name,
            "train_examples": None if self.splits.streaming else len(self.splits.train),  # a stream has no length
            "examples_per_class": self.recipe["data"]["examples_per_class"],
            "class_names": self.splits.class_names,
        }

    def _first_images(self, dataset, count: int) -> dict:
        """The first COUNT images of a split as one evaluation batch, read by the main process alone."""
        if isinstance(dataset, StreamSplit):
            data, splits = self.recipe["data"], self.splits
            loader = make_stream_loader(
                dataset, splits.image_column, splits.label_column, len(splits.class_names), count, shuffle=False,
                bad_images=data["bad_images"], image_size=self.recipe["model"]["image_size"],
            )  # fmt: skip
            return next(iter(loader))
        rows = dataset.select(range(min(count, len(dataset))))
        return next(iter(self._loader(rows, len(rows), train=False, workers=0)))

    def _log_pictures(self, model, evaluated: dict, count: int = 16) -> None:
        """A grid of predictions and a few attention rollouts of the first test (or minival) images, to TensorBoard.

        The predictions are those of the split's evaluation just done (EVALUATED, by split name), where its rows
        are known; a picture is a nicety: if it fails, the run says so and still writes its results and card.
        """
        if "tensorboard" not in self.cfg["report_to"]:
            return
        splits = self.splits
        name = "test" if splits.test is not None else "eval"
        if name not in evaluated:
            return
        try:
            from vit_hf.publish.attention_maps import (
                attention_rollout,
                pixels_to_images,
                prediction_grid,
                rollout_overlay,
            )

            batch = self._first_images(splits.test if name == "test" else splits.eval, count)
            pixels = self.eval_transform(batch["pixels"].to(self.accelerator.device))
            predictions = self._predictions_of(model, batch["index"].tolist(), pixels, evaluated[name])
            images = pixels_to_images(pixels)
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            grid = prediction_grid(images, batch["labels"].tolist(), predictions, splits.class_names)
            writer.add_image("test/predictions", grid, global_step=0, dataformats="HWC")
            maps = attention_rollout(model, pixels[:4])
            for i in range(len(maps)):
                overlay = rollout_overlay(images[i], maps[i])
                writer.add_image(f"test/attention_rollout_{i}", overlay, global_step=0, dataformats="HWC")
        except Exception as error:  # noqa: BLE001 - any failure here must not lose the run's results
            logger.warning("could not draw the prediction pictures: %s", " ".join(str(error).split()))

    def _predictions_of(self, model, rows: list[int], pixels: torch.Tensor, evaluated: dict) -> list[int]:
        """The class predicted for each of ROWS: looked up in the split's evaluation (row numbers of a map-style
        split), or, for a stream's rows, computed again from PIXELS."""
        predicted = dict(zip(evaluated["index"].tolist(), evaluated["predictions"].tolist(), strict=True))
        if self.splits.streaming or not all(row in predicted for row in rows):
            with torch.inference_mode():
                return model(pixel_values=pixels).logits.argmax(-1).tolist()
        return [predicted[row] for row in rows]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (FSDP-sharded or replicated) DTensor; a plain tensor as it is."""
    # Duck-typed: importing torch.distributed.tensor costs a second of start-up in runs that never shard.
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """FSDP on CPU gloo processes (`accelerate launch --config_file accelerate_configs/fsdp.yaml` without a GPU).

    Accelerate 1.x applies its FSDP plugin on accelerator devices only and runs such a launch as plain DDP on the CPU.
    Marking its state FSDP (both the process state and the accelerator's) sends `prepare`, `save_state`,
    `load_state` and `get_state_dict` down the same FSDP2 path as on GPUs: `fully_shard` works on gloo. The plugin
    reads the launch's FSDP_* settings, as Accelerate's own would.
    """
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    for state in (PartialState(), accelerator.state):  # AcceleratorState copies the process state's type when built
        state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def _process_started_perf() -> float:
    """The process's launch on the `time.perf_counter` clock."""
    return time.perf_counter() - (time.time() - psutil.Process().create_time())


def _hardware(accelerator: Accelerator) -> str:
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    return f"{accelerator.num_processes}x {name}"


def run(recipe: dict, resume: str | None = None) -> dict:
    """Train as RECIPE says; returns the results (also written to output.dir/results.json)."""
    job = FineTune(recipe, resume)
    job.train()
    return job.finish()
