"""Training speed of the fine-tuning loop: images/s, MFU, input-pipeline images/s and peak memory, against the Trainer.

    python -m vit_hf.bench --model tiny --image-size 32 --micro-batch 64 --compare-trainer
    python -m vit_hf.bench --model ViT-B_16 --layers 2 --image-size 224 --micro-batch 16 --compare-trainer
    python -m vit_hf.bench --model ViT-B_16 --image-size 224 --micro-batch 256 --precision bf16 --compile \
        --compare-trainer --steps 30
    python -m vit_hf.bench --recipe recipes/cifar10.json --set train.micro_batch_size=128
    python -m vit_hf.bench --model ViT-B_16 --layers 2 --image-size 224 --micro-batch 16 --momentum-dtype bfloat16 \
        --gradient-checkpointing

The loop is measured by running `vit_hf.finetune.run` itself (eval and test off) and timing the updates after warm-up
from its own logs, so the figure is the loop's real speed. `--compare-trainer` trains the same model, data, batch,
optimizer and precision with `transformers.Trainer`, fed as the transformers image-classification example feeds it:
per-image random resized crop and flip in PIL in the workers (`vit_hf.bench_data.example_loader`), whatever else the
recipe's augment asks for. Each case runs in a fresh process, so peak memory (CUDA's peak allocation, or on a CPU the
process's peak RSS) and compile caches are its own. Without `--recipe` the data is the Hub's CIFAR-10 (or
`--set data.dataset=...`) and the model a from-scratch ViT. Prints one JSON line a case, then a Markdown table.
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig

from vit_hf.bench_data import example_loader, images_per_second
from vit_hf.data import load_splits, make_loader
from vit_hf.errors import UserError, cli_entry
from vit_hf.finetune import run
from vit_hf.inputs import TrainInputs
from vit_hf.model import VIT_BASE, build_model
from vit_hf.optim import make_optimizer, make_schedule
from vit_hf.recipe import load_recipe, resolve_recipe
from vit_hf.run_log import TRAIN_LOG

# From-scratch shapes of the paper's models (and a tiny one for CPUs): their speed needs no checkpoint.
MODELS = {
    "ViT-B_16": VIT_BASE | {"patch_size": 16},
    "ViT-Ti_16": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768}
    | {"patch_size": 16},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256}
    | {"patch_size": 4},
}
# Dense bf16 peaks (NVIDIA data sheets), matched in this order against the device name.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
LOOP, TRAINER = "vit_hf.finetune", "transformers.Trainer"


def training_flops_per_image(config: ViTConfig) -> float:
    """FLOPs of one training step per image: 3x the forward (the backward costs twice the forward).

    forward = 2 (N-1) (C P^2) D                                       patch embedding
            + L (4 N D^2 * 2  +  2 N^2 D * 2  +  2 N D M * 2)         per layer: qkv + out, attention, MLP
    with N tokens (patches + class token), D the width, M the MLP width, L layers, P the patch and C channels.
    The head, norms and softmax are left out: under 0.5% of ViT-B/16 at 224 px (105 GFLOPs an image).
    """
    n, d, m = (config.image_size // config.patch_size) ** 2 + 1, config.hidden_size, config.intermediate_size
    patch_embedding = 2 * (n - 1) * config.num_channels * config.patch_size**2 * d
    layer = 4 * n * d**2 * 2 + 2 * n**2 * d * 2 + 2 * n * d * m * 2
    return 3 * (patch_embedding + config.num_hidden_layers * layer)


def peak_tflops(device: str) -> float | None:
    """The dense bf16 peak of a known GPU, by name; None for a CPU or an unknown device."""
    return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in device), None)


def bench_recipe(args: argparse.Namespace) -> dict:
    """The recipe to measure: --recipe (else CIFAR-10 and a from-scratch ViT), flags, --set, then a short run."""
    overrides = []
    if args.model:
        overrides += ["model.pretrained=null", f"model.config={json.dumps(MODELS[args.model])}"]
    if args.layers:
        overrides.append(f"model.config.num_hidden_layers={args.layers}")
    if args.image_size:
        overrides.append(f"model.image_size={args.image_size}")
    if args.micro_batch:
        overrides += [f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.micro_batch}"]
    if args.precision:
        overrides.append(f"train.mixed_precision={args.precision}")
    if args.compile:
        overrides.append("train.compile=true")
    if args.momentum_dtype:
        overrides.append(f"optim.momentum_dtype={args.momentum_dtype}")
    if args.gradient_checkpointing:
        overrides.append("train.gradient_checkpointing=true")
    total = args.warmup + args.steps
    # No eval, no test, no checkpoint before the end.
    overrides += [*args.set, "data.eval_split=null", "data.test_split=null", "schedule.warmup_steps=0"]
    overrides += [f"schedule.total_steps={total}", f"train.save_every={total}", "hub.push=false"]
    if args.recipe:
        recipe = load_recipe(args.recipe, overrides)
    else:
        data = {"dataset": "cifar10", "train_split": "train"}
        recipe = resolve_recipe({"model": {"pretrained": None}, "data": data}, overrides)
    if args.layers and recipe["model"]["pretrained"] is not None:
        raise UserError("--layers: only a from-scratch model (--model, or model.pretrained null) has a layer count")
    every = recipe["train"]["log_every"]
    if args.warmup % every or args.steps % every:
        raise UserError(
            f"--warmup {args.warmup} and --steps {args.steps} must be multiples of train.log_every ({every}): "
            "the loop's logs time the updates; choose them so, or --set train.log_every=N"
        )
    return recipe


# ----------------------------------------------------------------------------------------------------------
# The cases, each in its own process


def loop_case(recipe: dict, warmup: int, steps: int) -> dict:
    """`finetune.run` for warmup + steps updates; images/s over the updates after warm-up.

    The loop logs every `train.log_every` updates, after a host synchronisation (`UpdateWindow.reduce`): the wall
    times its train_log.jsonl records at update `warmup` and at the last update bound the timed updates, on any
    device, with the loop's own logging cost and nothing else added.
    """
    with tempfile.TemporaryDirectory() as out:
        run(resolve_recipe(recipe, [f"output.dir={out}"]))
        rows = [json.loads(line) for line in (Path(out) / TRAIN_LOG).read_text().splitlines()]
        config = ViTConfig.from_pretrained(out)
    windows = [row for row in rows if "time" in row]  # the last update of each log window
    ends = {row["step"]: row["time"] for row in windows}
    waits = [row["data_wait_share"] for row in windows if row["step"] > warmup]
    seconds = ends[warmup + steps] - ends[warmup]
    device = _device()
    memory = _peak_memory_gib(device)  # before the input pipeline runs alone
    splits = load_splits(recipe["data"])
    inputs = TrainInputs(recipe, len(splits.class_names), torch.Generator(device).manual_seed(0))
    loader = make_loader(
        splits.train, splits.image_column, splits.label_column, recipe["train"]["micro_batch_size"],
        shuffle=True, num_workers=recipe["data"]["num_workers"], image_size=recipe["model"]["image_size"],
    )  # fmt: skip
    return {
        "images_per_second": steps * recipe["train"]["global_batch_size"] / seconds,
        "peak_memory_gib": memory,
        "input_images_per_second": images_per_second(
            loader, lambda batch: inputs(_to_device(batch, device))[0], _batches(warmup, steps), device
        ),
        "data_wait_share": sum(waits) / len(waits),
        "config": config.to_dict(),
    }


class _StepTimer(TrainerCallback):
    """The (synchronised) time at which the Trainer finishes each of two updates."""

    def __init__(self, *steps: int) -> None:
        self.steps, self.times = steps, {}

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step in self.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times[state.global_step] = time.perf_counter()


def trainer_case(recipe: dict, warmup: int, steps: int) -> dict:
    """`transformers.Trainer` on the recipe's model, optimizer, schedule, batches and precision; images/s after warm-up.

    Fed as the transformers image-classification example: `with_transform` of per-image transforms, a stacking collate.
    """
    data, train = recipe["data"], recipe["train"]
    splits = load_splits(data)
    set_seed(train["seed"])
    model = build_model(recipe["model"], splits.class_names)
    optimizer = make_optimizer(model, recipe["optim"])
    scheduler = make_schedule(optimizer, recipe["schedule"])
    feed = argparse.Namespace(
        image_size=recipe["model"]["image_size"], batch_size=train["micro_batch_size"], num_workers=data["num_workers"]
    )
    example = example_loader(splits.train, splits.image_column, splits.label_column, feed)
    timer = _StepTimer(warmup, warmup + steps)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out,
            per_device_train_batch_size=train["micro_batch_size"],
            gradient_accumulation_steps=train["global_batch_size"] // train["micro_batch_size"],
            max_steps=warmup + steps,
            max_grad_norm=recipe["optim"]["max_grad_norm"] or 0.0,
            bf16=train["mixed_precision"] == "bf16",
            fp16=train["mixed_precision"] == "fp16",
            torch_compile=train["compile"],
            activation_checkpointing=train["gradient_checkpointing"],
            activation_checkpointing_kwargs={"use_reentrant": False},  # as the loop
            dataloader_num_workers=data["num_workers"],
            remove_unused_columns=False,  # the collate needs the image and label columns
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            seed=train["seed"],
            use_cpu=not torch.cuda.is_available(),  # bf16 on a CPU is refused unless asked for explicitly
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=example.dataset,
            data_collator=example.collate_fn,
            optimizers=(optimizer, scheduler),
            callbacks=[timer],
        )
        trainer.train()
    device = _device()
    memory = _peak_memory_gib(device)
    return {
        "images_per_second": steps * train["global_batch_size"] / (timer.times[warmup + steps] - timer.times[warmup]),
        "peak_memory_gib": memory,
        "input_images_per_second": images_per_second(
            example, lambda batch: batch["pixel_values"].to(device, non_blocking=True), _batches(warmup, steps), device
        ),
        "config": model.config.to_dict(),
    }


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batches(warmup: int, steps: int) -> argparse.Namespace:
    """The warm-up and timed batch counts of `bench_data.images_per_second`."""
    return argparse.Namespace(warmup=warmup, batches=steps)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value for key, value in batch.items()
    }


def _peak_memory_gib(device: torch.device) -> float:
    """The device's peak allocated memory; on a CPU the peak RSS of this process (data workers not included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def _run_case(case, recipe: dict, warmup: int, steps: int) -> dict:
    """CASE, its chatter (progress bars, the loop's results line) on stderr: stdout is for the JSON lines."""
    # Being spawned made spawn this process's default too; fork the data workers as a plain run does (the example's
    # transforms are local functions, which a spawned worker cannot receive).
    multiprocessing.set_start_method("fork", force=True)
    with contextlib.redirect_stdout(sys.stderr):
        return case(recipe, warmup, steps) | {"device": _device_name()}


def _in_fresh_process(case, recipe: dict, warmup: int, steps: int) -> dict:
    """CASE in a new process, so that its peak memory and compile caches are its own.

    Spawned, not forked: a fork is only safe while this process has not touched CUDA, which imports may do.
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_case, case, recipe, warmup, steps).result()


# ----------------------------------------------------------------------------------------------------------
# Report


def _row(name: str, result: dict, recipe: dict, args: argparse.Namespace) -> dict:
    config = ViTConfig.from_dict(result["config"])
    flops = training_flops_per_image(config)
    peak = args.peak_tflops or peak_tflops(result["device"])
    train = recipe["train"]
    return {
        "case": name,
        "device": result["device"],
        "model": {
            k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "patch_size")
        },
        "image_size": config.image_size,
        "micro_batch": train["micro_batch_size"],
        "global_batch": train["global_batch_size"],
        "precision": train["mixed_precision"],
        "compile": train["compile"],
        "gradient_checkpointing": train["gradient_checkpointing"],
        "momentum_dtype": recipe["optim"]["momentum_dtype"],
        "num_workers": recipe["data"]["num_workers"],
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "images_per_second": round(result["images_per_second"], 1),
        "gflops_per_image": round(flops / 1e9, 3),
        "peak_tflops": peak,
        "mfu": round(result["images_per_second"] * flops / (peak * 1e12), 4) if peak else None,
        "input_images_per_second": round(result["input_images_per_second"], 1),
        "peak_memory_gib": round(result["peak_memory_gib"], 2),
        "data_wait_share": round(result["data_wait_share"], 3) if "data_wait_share" in result else None,
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| case | train images/s | MFU | input images/s | peak memory GiB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        lines.append(
            f"| {row['case']} | {row['images_per_second']:,.1f} | {mfu} | {row['input_images_per_second']:,.0f} "
            f"| {row['peak_memory_gib']:.2f} |"
        )
    if len(rows) == 2:
        lines.append(f"\n{LOOP} / {TRAINER}: {rows[0]['images_per_second'] / rows[1]['images_per_second']:.2f}x")
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vit_hf.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", help="a JSON recipe (default: the Hub's CIFAR-10, a from-scratch ViT-B/16)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE", help="override a field")
    parser.add_argument("--model", choices=list(MODELS), help="a from-scratch model of this shape")
    parser.add_argument("--layers", type=_positive, help="keep only this many transformer layers")
    parser.add_argument("--image-size", type=_positive)
    parser.add_argument("--micro-batch", type=_positive, help="the micro-batch and the global batch (no accumulation)")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    parser.add_argument(
        "--momentum-dtype", choices=["float32", "bfloat16"], help="SGD's momentum (optim.momentum_dtype)"
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations (train.gradient_checkpointing)"
    )
    parser.add_argument("--steps", type=_positive, default=30, help="timed optimizer updates, a multiple of log_every")
    parser.add_argument(
        "--warmup", type=_positive, default=10, help="updates before the timing, a multiple of log_every"
    )
    parser.add_argument("--compare-trainer", action="store_true", help="also run transformers.Trainer, print the ratio")
    parser.add_argument("--peak-tflops", type=float, help="the peak for MFU (default: a known GPU's dense bf16 peak)")
    args = parser.parse_args(argv)
    recipe = bench_recipe(args)
    # One device: on a multi-GPU machine the Trainer would otherwise spread over all of them with DataParallel.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    cases = [(LOOP, loop_case)] + ([(TRAINER, trainer_case)] if args.compare_trainer else [])
    rows = []
    for name, case in cases:
        rows.append(_row(name, _in_fresh_process(case, recipe, args.warmup, args.steps), recipe, args))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(_table(rows))


if __name__ == "__main__":
    main()
