"""Input pipeline speed at 224 px: our loader + DeviceTransform against per-image transforms in the workers.

Both pipelines read the same images with the same DataLoader settings and end with the float32 training batch
(random resized crop, flip, [-1, 1]) on the device (CUDA if there is one, else the CPU):
- ours: `make_loader` + `DeviceTransform(train=True)`. CIFAR leaves the workers as 32 px uint8 batches, cropped,
  resized and flipped on the device; photos are cropped from the original, resized and flipped in the workers
  (of a JPEG only the crop's region decoded, at reduced scale where the crop allows) and cross as 224 px uint8;
- the baseline: transformers' image-classification example, `dataset.with_transform` of per-image RandomResizedCrop,
  RandomHorizontalFlip, ToTensor and Normalize, in PIL and torch as torchvision does them (torchvision is no
  dependency of this project).
Both see a photo upright by its EXIF orientation (the example through datasets' decode, which applies it).

    python benchmarks/bench_data.py --num-workers 2        # the train split of the Hub's uoft-cs/cifar10
    python benchmarks/bench_data.py --dataset '{"path": "parquet", "data_files": {"train": "cifar10/train.parquet"}}'
    python benchmarks/bench_data.py --photos ~/Pictures --num-workers 1 --batch-size 64 --batches 20
    python benchmarks/bench_data.py --make-photos 2000 --num-workers 1 --batch-size 64 --batches 20
    python benchmarks/bench_data.py --make-photos 2000 --num-workers 1 --batch-size 64 --batches 20 \
        --jpeg-decoder pillow

--dataset takes a short name (cifar10, cifar100) or the keyword arguments of datasets.load_dataset as JSON, as
validate's does; its train split is read. --photos DIR reads every image file under DIR (class folders or not);
--make-photos N writes N JPEGs into a temporary folder first: the first N images of --dataset, upscaled (bicubic) to
widths and heights drawn in 300-640 px (--photo-sides), so at mixed aspect ratios, quality 90.

Prints one JSON line per pipeline (images/s, and per worker), then a Markdown table with the ratio. On a CPU device,
each fresh float batch (77 MB at 224 px and batch 128) would page-fault anew: glibc is told to reuse freed blocks (both
pipelines). THP_MEM_ALLOC_ENABLE=1 in the environment gives PyTorch huge pages for large CPU tensors; torch reads it
when it starts, so set it on the command line. With --num-workers 0 --threads 1, each pipeline does all its work on
one core: the ratio of CPU costs.
"""

import argparse
import ctypes
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from trainer_baseline import collate, train_transform

from vit_hf.data import photos as data_module
from vit_hf.data.images import image_paths
from vit_hf.data.loader import make_loader
from vit_hf.data.sources import load_splits
from vit_hf.data.transforms import DeviceTransform
from vit_hf.utils.errors import UserError, cli_entry
from vit_hf.validate import parse_dataset

CROP_SCALE = (0.05, 1.0)
BASELINE = "transformers example: per-image PIL transforms in the workers"
OURS = "vit_hf: uint8 loader + DeviceTransform"


def example_loader(dataset, image_column: str, label_column: str, args: argparse.Namespace) -> DataLoader:
    """The example's pipeline, with our loader's DataLoader settings."""
    workers = args.num_workers
    return DataLoader(
        dataset.with_transform(
            functools.partial(
                train_transform, image_column=image_column, size=args.image_size, scale=CROP_SCALE, hflip=True
            )
        ),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=functools.partial(collate, label_column=label_column),
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

    A training batch at 224 px is a fresh tensor of tens of MB each step; by default glibc maps it anew and the first
    touch of every page faults, work that is no part of either pipeline. A GPU's caching allocator needs no such help.
    Both pipelines, and the workers forked later, run under this setting.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: leave the allocator as it is
        return
    mmap_threshold, trim_threshold = -3, -1  # mallopt's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD
    libc.mallopt(mmap_threshold, 1 << 30)
    libc.mallopt(trim_threshold, 1 << 31)


def photo_dataset(paths: list[Path]) -> datasets.Dataset:
    """Image files as a data set of one class: the bench times pixels, not labels."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["photo"])})
    return datasets.Dataset.from_dict({"image": [str(p) for p in paths], "label": [0] * len(paths)}, features=features)


def make_photos(
    source: datasets.Dataset, image_column: str, count: int, sides: tuple[int, int], folder: Path
) -> list[Path]:
    """COUNT JPEGs in FOLDER: the first images of SOURCE upscaled to widths and heights drawn in SIDES (low, high)."""
    rng = np.random.default_rng(0)
    paths = []
    for i, row in enumerate(source.select(range(count))):
        width, height = (int(side) for side in rng.integers(sides[0], sides[1] + 1, 2))
        paths.append(folder / f"{i:06d}.jpg")
        row[image_column].convert("RGB").resize((width, height), Image.BICUBIC).save(paths[-1], quality=90)
    return paths


def bench_images(args: argparse.Namespace, folder: Path) -> tuple[datasets.Dataset, str, str, str]:
    """The images to time, their image and label columns, and what they are in words."""
    if args.photos is not None:
        return photo_dataset(image_paths([args.photos])), "image", "label", str(args.photos)
    data = {"dataset": parse_dataset(args.dataset), "train_split": "train", "eval_split": None, "test_split": None}
    splits = load_splits(data)
    if args.make_photos is None:
        return splits.train, splits.image_column, splits.label_column, splits.name
    if not 0 < args.make_photos <= len(splits.train):
        raise UserError(
            f"--make-photos: expected 1 to {len(splits.train)} (the {splits.name} images), got {args.make_photos}"
        )
    low, high = args.photo_sides
    if not 0 < low <= high:
        raise UserError(f"--photo-sides: expected LOW HIGH with 0 < LOW <= HIGH, got {low} {high}")
    paths = make_photos(splits.train, splits.image_column, args.make_photos, (low, high), folder)
    return photo_dataset(paths), "image", "label", f"{len(paths)} JPEGs of {low}-{high} px made from {splits.name}"


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_data.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dataset", default="cifar10", help='a short name (default cifar10) or a JSON object: {"path": ...}'
    )
    photos = parser.add_mutually_exclusive_group()
    photos.add_argument("--photos", type=Path, metavar="DIR", help="time the image files under DIR instead")
    photos.add_argument("--make-photos", type=int, metavar="N", help="time N JPEGs made from --dataset instead")
    parser.add_argument("--photo-sides", type=int, nargs=2, default=[300, 640], metavar=("LOW", "HIGH"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=50, help="timed batches per pipeline")
    parser.add_argument("--warmup", type=int, default=5, help="batches before the timing starts")
    parser.add_argument("--threads", type=int, help="torch threads on a CPU device (default: cores - workers, >= 1)")
    parser.add_argument(
        "--jpeg-decoder", choices=("region", "pillow"), help="ours: the crop's region (vit_hf._jpeg, the default "
        "where it is built) or Pillow's whole decode, as an install without the extension"
    )  # fmt: skip
    args = parser.parse_args(argv)
    decoder = choose_jpeg_decoder(args.jpeg_decoder)
    with tempfile.TemporaryDirectory() as folder:
        dataset, image_column, label_column, images = bench_images(args, Path(folder))
        if (args.warmup + args.batches) * args.batch_size > len(dataset):
            raise UserError(f"--warmup plus --batches batches of --batch-size exceed the {len(dataset)} images")
        rates = time_pipelines(dataset, image_column, label_column, args)
    setting = {
        "images": images,
        "device": str(_device()),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "batches": args.batches,
        "jpeg_decoder": decoder,
    }
    for name, rate in rates.items():
        row = {"pipeline": name, **setting, "images_per_second": round(rate, 1)}
        row |= {"images_per_second_per_worker": round(rate / max(1, args.num_workers), 1)}
        print(json.dumps(row | {"ratio": round(rate / rates[BASELINE], 3)}))
    print("\n| pipeline | images/s | per worker | ratio |\n| --- | ---: | ---: | ---: |")
    for name, rate in rates.items():
        per_worker = rate / max(1, args.num_workers)
        print(f"| {name} | {rate:,.0f} | {per_worker:,.0f} | {rate / rates[BASELINE]:.2f} |")


def choose_jpeg_decoder(asked: str | None) -> str:
    """Set how our loader decodes JPEGs, in this process and its workers; return it ("region" or "pillow")."""
    if asked == "region" and data_module._jpeg is None:
        raise UserError("--jpeg-decoder region: vit_hf._jpeg is not built (no C compiler or libjpeg-turbo headers)")
    if asked == "pillow":
        os.environ[data_module.JPEG_DECODER_VARIABLE] = "pillow"  # workers started by spawn import it anew
        data_module._jpeg = None
    return "pillow" if data_module._jpeg is None else "region"


def time_pipelines(dataset: datasets.Dataset, image_column: str, label_column: str, args) -> dict[str, float]:
    """Images/s of the example's pipeline and of ours on DATASET, one after the other."""
    device = _device()
    if device.type == "cpu":
        _reuse_freed_memory()
        # The transform shares the CPU with the decode workers: with more threads than free cores, OpenMP threads
        # wait on each other whenever a worker runs.
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - args.num_workers))
    transform = DeviceTransform(args.image_size, train=True, crop_scale=CROP_SCALE)
    generator = torch.Generator(device).manual_seed(0)
    ours = functools.partial(
        make_loader, dataset, image_column, label_column, args.batch_size, shuffle=True,
        num_workers=args.num_workers, image_size=args.image_size, crop_scale=CROP_SCALE, hflip=True,
    )  # fmt: skip
    pipelines = {
        BASELINE: (
            lambda: example_loader(dataset, image_column, label_column, args),
            lambda batch: batch["pixel_values"].to(device, non_blocking=True),
        ),
        OURS: (
            ours,
            lambda batch: transform(batch["pixels"].to(device, non_blocking=True), generator, batch["prepared"]),
        ),
    }
    return {name: images_per_second(loader(), produce, args, device) for name, (loader, produce) in pipelines.items()}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    main()
