"""Input pipeline speed, CIFAR at 224 px: our loader + DeviceTransform against per-image transforms in the workers.

Both pipelines read the same parquet file with the same DataLoader settings and end with the float32 training batch
(random resized crop, flip, [-1, 1]) on the device (CUDA if there is one, else the CPU):
- ours: `make_loader` collates 32 px uint8 batches; `DeviceTransform(train=True)` crops, resizes and flips them there;
- the baseline: transformers' image-classification example, `dataset.with_transform` of per-image RandomResizedCrop,
  RandomHorizontalFlip, ToTensor and Normalize, in PIL and torch as torchvision does them (torchvision is no
  dependency of this project).

    python -m vit_hf.bench_data --parquet ../shared/data/cifar10/train.parquet --num-workers 2

Prints one JSON line per pipeline, then a Markdown table with the ratio. On a CPU device, page faults on each fresh
77 MB float batch cost as much as the resize: glibc is told to reuse freed blocks, and PyTorch's
THP_MEM_ALLOC_ENABLE=1 (huge pages for large tensors) is set unless the environment says otherwise. Both settings
apply to both pipelines; huge pages help the example more (THP_MEM_ALLOC_ENABLE=0 measures without).
With --num-workers 0 --threads 1, each pipeline does all its work on one core: the ratio of CPU costs.
"""

import argparse
import ctypes
import functools
import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Huge pages for large CPU tensors (read when torch starts): both pipelines run in this process and share it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from PIL import Image
from torch.utils.data import DataLoader

from vit_hf.data import DeviceTransform, load_splits, make_loader
from vit_hf.errors import UserError, cli_entry

DEFAULT_PARQUET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train.parquet"
CROP_SCALE = (0.05, 1.0)
BASELINE = "transformers example: per-image PIL transforms in the workers"
OURS = "vit_hf: uint8 loader + DeviceTransform"


def example_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, width, height): torchvision's RandomResizedCrop.get_params, with Python's random module."""
    for _ in range(10):
        area = width * height * random.uniform(*CROP_SCALE)
        aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_width, crop_height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left, top = random.randint(0, width - crop_width), random.randint(0, height - crop_height)
            return left, top, crop_width, crop_height
    crop_width, crop_height = min(width, round(height * 4 / 3)), min(height, round(width * 4 / 3))
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def example_train_image(image: Image.Image, size: int) -> torch.Tensor:
    """RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), Normalize(0.5, 0.5) of one PIL image."""
    left, top, width, height = example_crop_box(image.width, image.height)
    image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + width, top + height))
    if random.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().float().div(255)
    return (pixels - 0.5) / 0.5


def example_train_transforms(examples: dict, image_column: str, size: int) -> dict:
    """The example's `with_transform` function: each image of a batch of rows on its own."""
    examples["pixel_values"] = [example_train_image(image.convert("RGB"), size) for image in examples[image_column]]
    return examples


def example_collate(examples: list[dict], label_column: str) -> dict:
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    return {"pixel_values": pixel_values, "labels": torch.tensor([example[label_column] for example in examples])}


def example_loader(dataset, image_column: str, label_column: str, args: argparse.Namespace) -> DataLoader:
    """The example's pipeline, with our loader's DataLoader settings."""
    workers = args.num_workers
    return DataLoader(
        dataset.with_transform(
            functools.partial(example_train_transforms, image_column=image_column, size=args.image_size)
        ),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=functools.partial(example_collate, label_column=label_column),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def images_per_second(
    loader: DataLoader, produce: Callable[[dict], torch.Tensor], args: argparse.Namespace, device: torch.device
) -> float:
    """Steady-state rate of final batches: `args.batches` timed after `args.warmup` that start the workers.

    The loader's workers stop when it is dropped on return, so they do not compete with the next pipeline's.
    """
    batches = iter(loader)

    def run(count: int) -> int:
        images = sum(produce(next(batches)).shape[0] for _ in range(count))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return images

    run(args.warmup)
    start = time.perf_counter()
    images = run(args.batches)
    return images / (time.perf_counter() - start)


def _reuse_freed_memory() -> None:
    """Have glibc keep freed large blocks for reuse instead of returning them to the kernel (CPU only).

    A training batch at 224 px is a fresh 77 MB tensor each step; by default glibc maps it anew and the first touch
    of every page faults, which costs a CPU as much as the resize itself. A GPU's caching allocator needs no such
    help. Both pipelines, and the workers forked later, run under this setting.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: leave the allocator as it is
        return
    mmap_threshold, trim_threshold = -3, -1  # mallopt's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD
    libc.mallopt(mmap_threshold, 1 << 30)
    libc.mallopt(trim_threshold, 1 << 31)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parquet", type=Path, default=DEFAULT_PARQUET, help="CIFAR in the Hub's parquet schema")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=50, help="timed batches per pipeline")
    parser.add_argument("--warmup", type=int, default=5, help="batches before the timing starts")
    parser.add_argument("--threads", type=int, help="torch threads on a CPU device (default: cores - workers, >= 1)")
    args = parser.parse_args(argv)
    if not args.parquet.is_file():
        raise UserError(f"--parquet {args.parquet}: no such file")
    data = {"dataset": {"path": "parquet", "data_files": {"train": str(args.parquet)}}}
    splits = load_splits({**data, "train_split": "train", "eval_split": None, "test_split": None})
    if (args.warmup + args.batches) * args.batch_size > len(splits.train):
        raise UserError(f"--warmup plus --batches batches of --batch-size exceed the {len(splits.train)} images")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        _reuse_freed_memory()
        # The transform shares the CPU with the decode workers: with more threads than free cores, OpenMP threads
        # wait on each other whenever a worker runs (on 2 cores with 2 workers, 3x slower than one thread).
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - args.num_workers))
    transform = DeviceTransform(args.image_size, train=True, crop_scale=CROP_SCALE)
    generator = torch.Generator(device).manual_seed(0)
    columns = (splits.image_column, splits.label_column)
    pipelines = {
        BASELINE: (
            lambda: example_loader(splits.train, *columns, args),
            lambda batch: batch["pixel_values"].to(device, non_blocking=True),
        ),
        OURS: (
            lambda: make_loader(splits.train, *columns, args.batch_size, shuffle=True, num_workers=args.num_workers),
            lambda batch: transform(batch["pixels"].to(device, non_blocking=True), generator),
        ),
    }
    setting = {
        "device": str(device),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "batches": args.batches,
    }
    rates = {name: images_per_second(loader(), produce, args, device) for name, (loader, produce) in pipelines.items()}
    for name, rate in rates.items():
        ratio = rate / rates[BASELINE]
        print(json.dumps({"pipeline": name, **setting, "images_per_second": round(rate, 1), "ratio": round(ratio, 2)}))
    print("\n| pipeline | images/s | ratio |\n| --- | ---: | ---: |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / rates[BASELINE]:.2f} |")


if __name__ == "__main__":
    main()
