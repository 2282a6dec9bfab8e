"""Training speed of the fine-tuning loop: images/s, MFU, input-pipeline images/s and peak memory, against the Trainer.

    python benchmarks/bench_loop.py --model tiny --image-size 32 --micro-batch 64 --compare-trainer
    python benchmarks/bench_loop.py --model ViT-B_16 --layers 2 --image-size 224 --micro-batch 16 --compare-trainer
    python benchmarks/bench_loop.py --model ViT-B_16 --image-size 224 --micro-batch 256 --precision bf16 --compile \
        --compare-trainer --steps 30
    python benchmarks/bench_loop.py --recipe recipes/cifar10.json --set train.micro_batch_size=128
    python benchmarks/bench_loop.py --model ViT-B_16 --layers 2 --image-size 224 --micro-batch 16 \
        --momentum-dtype bfloat16 --gradient-checkpointing
    python benchmarks/bench_loop.py --whole-process --model ViT-B_16 --layers 1 --image-size 224 --micro-batch 16 \
        --steps 20

The loop is timed by running the training loop's `run` itself (eval and test off) and timing the updates after
warm-up from its own logs, so the figure is the loop's real speed. `--compare-trainer` trains the same model, data,
batch, optimizer and precision with `transformers.Trainer`, fed as the transformers image-classification example feeds
it: per-image random resized crop and flip in PIL in the workers (`bench_data.example_loader`), whatever else the
recipe's augment asks for. Each case runs in a fresh process, so peak memory (CUDA's peak allocation, or on a CPU the
process's peak RSS) and compile caches are its own. Without `--recipe` the data is the Hub's CIFAR-10 (or
`--set data.dataset=...`, or `--dataset` a local parquet) and the model a from-scratch ViT. Prints one JSON line a
case, then a Markdown table.

`--whole-process` times whole processes from launch to exit instead: `python -m vit_hf.finetune RECIPE` against
`python benchmarks/trainer_baseline.py RECIPE` (the same run done with `transformers.Trainer`), `--repeats` times each,
interleaved so that other load on the machine falls on both; `--steps` updates, no minival, the test split scored
and the model saved at the end, on `--dataset` or random CIFAR-shaped images. Prints a JSON line a run (wall time and
each side's startup, training and finish seconds), then the medians and the ratio of the Trainer's time to ours.
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from accelerate.utils import set_seed
from bench_data import example_loader, images_per_second
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig

from vit_hf.data.inputs import TrainInputs
from vit_hf.data.loader import make_loader
from vit_hf.data.sources import load_splits
from vit_hf.models.build import VIT_BASE, build_model
from vit_hf.recipe import load_recipe, resolve_recipe
from vit_hf.training.loop import run
from vit_hf.training.optim import make_optimizer, make_schedule
from vit_hf.training.run_log import TRAIN_LOG
from vit_hf.utils.errors import RunError, UserError, cli_entry

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


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """The recipe fields that the model, batch, precision and memory flags set."""
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
    return overrides


def _base_recipe(args: argparse.Namespace, overrides: list[str], dataset: str | dict = "cifar10") -> dict:
    """--recipe with OVERRIDES, else a from-scratch ViT on DATASET's train split with them."""
    if args.recipe:
        recipe = load_recipe(args.recipe, overrides)
    else:
        data = {"dataset": dataset, "train_split": "train"}
        recipe = resolve_recipe({"model": {"pretrained": None}, "data": data}, overrides)
    if args.layers and recipe["model"]["pretrained"] is not None:
        raise UserError("--layers: only a from-scratch model (--model, or model.pretrained null) has a layer count")
    return recipe


def bench_recipe(args: argparse.Namespace) -> dict:
    """The recipe to measure: --recipe (else CIFAR-10 and a from-scratch ViT), flags, --set, then a short run."""
    overrides = _flag_overrides(args)
    total = args.warmup + args.steps
    # No eval, no test, no checkpoint before the end.
    overrides += [*args.set, "data.eval_split=null", "data.test_split=null", "schedule.warmup_steps=0"]
    overrides += [f"schedule.total_steps={total}", f"train.save_every={total}", "hub.push=false"]
    if getattr(args, "dataset", None):
        overrides.insert(0, f"data.dataset={json.dumps(local_dataset(args.dataset)[0])}")
    recipe = _base_recipe(args, overrides)
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
# Whole processes: launch to exit


def local_dataset(path: str | os.PathLike) -> tuple[dict, bool]:
    """The load_dataset arguments of a local parquet file (a train split) or folder (train.parquet, test.parquet
    if there is one), and whether it has a test split."""
    path = Path(path)
    files = {"train": path} if path.is_file() else {"train": path / "train.parquet", "test": path / "test.parquet"}
    files = {split: file for split, file in files.items() if file.is_file() and file.suffix == ".parquet"}
    if "train" not in files:
        raise UserError(f"--dataset {path}: not a parquet file, nor a folder with train.parquet (and test.parquet)")
    return {
        "path": "parquet",
        "data_files": {split: str(file.resolve()) for split, file in files.items()},
    }, "test" in files


def random_cifar(folder: Path, train: int, test: int, seed: int = 0) -> Path:
    """FOLDER with train.parquet and test.parquet of random 32 px PNG images in CIFAR-10's schema (img, label).

    Speed does not depend on what the pixels show; nothing is downloaded.
    """
    import io

    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        images = []
        for pixels in rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        rows = {"img": images, "label": rng.integers(0, len(names), count).tolist()}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / f"{split}.parquet")
    return folder


def whole_process_recipe(args: argparse.Namespace, dataset: dict, has_test: bool) -> dict:
    """The recipe both whole processes run: the flags' model, batch and precision on DATASET, `--steps` updates
    without warm-up, one checkpoint at the end, no minival, the test split (if any) scored at the end, --set last."""
    overrides = _flag_overrides(args)
    overrides += [f"data.dataset={json.dumps(dataset)}", "data.train_split=train", "data.eval_split=null"]
    overrides += [f"data.test_split={'test' if has_test else 'null'}", "schedule.warmup_steps=0"]
    overrides += [f"schedule.total_steps={args.steps}", f"train.save_every={args.steps}", *args.set, "hub.push=false"]
    recipe = _base_recipe(args, overrides, dataset)
    if recipe["model"]["pretrained"] is not None:
        raise UserError("--whole-process: the Trainer side builds a from-scratch model; set model.pretrained null")
    return recipe


# Each whole process: a short name for its files, its command's arguments before the recipe, and the file its timings
# are read from (in output.dir). The Trainer's script is no module of the package: it is started by its path.
WHOLE = {
    LOOP: ("finetune", ["-m", "vit_hf.finetune"], "results.json"),
    TRAINER: ("trainer_baseline", [str(Path(__file__).with_name("trainer_baseline.py"))], "trainer_results.json"),
}
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")
SHAPE_KEYS += ("image_size", "hidden_act", "layer_norm_eps")


def whole_process_run(name: str, recipe: dict, work: Path, repeat: int, env: dict) -> dict:
    """One whole process of case NAME on RECIPE (in ENV), timed from launch to exit; its breakdown."""
    short, command, results_file = WHOLE[name]
    stem = f"{short}-{repeat}"
    out = work / stem
    recipe_path = work / f"{stem}.json"
    recipe_path.write_text(json.dumps(resolve_recipe(recipe, [f"output.dir={out}"])))
    log = work / f"{stem}.log"
    with log.open("w") as output:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, *command, str(recipe_path)], stdout=output, stderr=output, env=env)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        last = (log.read_text().strip().splitlines() or ["no output"])[-1]
        raise RunError(f"python {' '.join(command)} exited with {done.returncode} (log {log}): {last}")
    results = json.loads((out / results_file).read_text())
    config = json.loads((out / "config.json").read_text())
    train = results.get("train_seconds")
    if train is None:  # the loop records its training speed: seconds = images / (images/s)
        train = (results["step"] * recipe["train"]["global_batch_size"]) / results["train_samples_per_second"]
    row = {"case": name, "repeat": repeat, "wall_seconds": round(wall, 2)}
    row |= {key: round(value, 2) for key, value in (("startup_seconds", results["startup_seconds"]),
            ("train_seconds", train), ("finish_seconds", results["finish_seconds"]))}  # fmt: skip
    row["other_seconds"] = round(wall - row["startup_seconds"] - row["train_seconds"] - row["finish_seconds"], 2)
    row["test_accuracy"] = results.get("test_accuracy")
    row["shape"] = {key: config.get(key) for key in SHAPE_KEYS} | {"num_labels": len(config["id2label"])}
    shutil.rmtree(out)
    return row


def whole_process(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Our whole process and the Trainer's, interleaved --repeats times (a JSON line a run): the recipe, the runs."""
    with tempfile.TemporaryDirectory(prefix="vit_hf_whole_") as work:
        work = Path(work)
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        if args.dataset:
            dataset, has_test = local_dataset(args.dataset)
        else:  # random data, and its datasets cache, live and go with the temporary folder
            dataset, has_test = local_dataset(random_cifar(work / "data", args.random_images, args.random_images // 4))
            env["HF_DATASETS_CACHE"] = str(work / "datasets_cache")
        recipe = whole_process_recipe(args, dataset, has_test)
        import datasets

        # The cache prepared once, so that no run pays for it alone.
        datasets.load_dataset(**dataset, cache_dir=env.get("HF_DATASETS_CACHE"))
        rows = []
        for repeat in range(args.repeats):
            for name in WHOLE:
                rows.append(whole_process_run(name, recipe, work, repeat, env))
                print(json.dumps(rows[-1]), flush=True)
    if rows[0]["shape"] != rows[1]["shape"]:
        raise RunError(f"the two processes trained different models: {rows[0]['shape']} and {rows[1]['shape']}")
    return recipe, rows


def _whole_table(rows: list[dict], recipe: dict) -> str:
    """Medians of each case's runs and the ratio of the Trainer's median wall time to ours."""
    shape, train = rows[0]["shape"], recipe["train"]
    case = (
        f"width {shape['hidden_size']}, {shape['num_hidden_layers']} layers, patch {shape['patch_size']}, "
        f"{shape['image_size']} px, batch {train['global_batch_size']}, {train['mixed_precision']}, "
        f"{recipe['schedule']['total_steps']} updates, {recipe['data']['num_workers']} workers"
    )
    lines = [
        f"whole process ({case}): medians of {len(rows) // 2} interleaved runs",
        "",
        "| case | wall s (each run) | wall s | startup s | train s | finish s | other s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    medians = {}
    for name in WHOLE:
        runs = [row for row in rows if row["case"] == name]
        medians[name] = {key: statistics.median(row[key] for row in runs) for key in runs[0] if key.endswith("seconds")}
        m = medians[name]
        each = " / ".join(f"{row['wall_seconds']:.1f}" for row in runs)
        lines.append(
            f"| {name} | {each} | {m['wall_seconds']:.1f} | {m['startup_seconds']:.1f} | {m['train_seconds']:.1f} "
            f"| {m['finish_seconds']:.1f} | {m['other_seconds']:.1f} |"
        )
    ratio = medians[TRAINER]["wall_seconds"] / medians[LOOP]["wall_seconds"]
    lines.append(f"\n{TRAINER} / {LOOP} wall time (above 1: ours is faster): {ratio:.2f}x")
    return "\n".join(lines)


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
def main(argv: list[str] | None = None) -> list[dict] | None:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_loop.py", description=__doc__.split("\n\n")[0])
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
    parser.add_argument(
        "--steps", type=_positive, help="timed optimizer updates, a multiple of log_every (default 30; whole: 20)"
    )
    parser.add_argument("--warmup", type=_positive, help="updates before the timing, a multiple of log_every (10)")
    parser.add_argument("--compare-trainer", action="store_true", help="also run transformers.Trainer, print the ratio")
    parser.add_argument("--peak-tflops", type=float, help="the peak for MFU (default: a known GPU's dense bf16 peak)")
    parser.add_argument("--dataset", help="a local parquet file (train) or folder of train.parquet and test.parquet")
    whole = parser.add_argument_group("whole processes, launch to exit, against transformers.Trainer")
    whole.add_argument(
        "--whole-process", action="store_true",
        help="time `python -m vit_hf.finetune` and trainer_baseline.py on the same recipe, interleaved",
    )  # fmt: skip
    whole.add_argument("--repeats", type=_positive, default=3, help="runs of each (default 3)")
    whole.add_argument(
        "--random-images", type=_positive, default=2000,
        help="without --dataset: random CIFAR-shaped training images (default 2000; a quarter as many to test)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    # One device: on a multi-GPU machine the Trainer would otherwise spread over all of them with DataParallel.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    if args.whole_process:
        if args.warmup is not None or args.compare_trainer:
            parser.error("--whole-process times whole runs against the Trainer: no --warmup, no --compare-trainer")
        args.steps = args.steps or 20
        recipe, rows = whole_process(args)
        print()
        print(_whole_table(rows, recipe))
        return rows
    args.steps, args.warmup = args.steps or 30, args.warmup or 10
    recipe = bench_recipe(args)
    cases = [(LOOP, loop_case)] + ([(TRAINER, trainer_case)] if args.compare_trainer else [])
    rows = []
    for name, case in cases:
        rows.append(_row(name, _in_fresh_process(case, recipe, args.warmup, args.steps), recipe, args))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(_table(rows))


if __name__ == "__main__":
    main()
