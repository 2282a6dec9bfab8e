"""Photo folders for the tests: real CIFAR-10 test images enlarged to photos of every size, mode and format."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from runs import tiny_recipe

CLASSES = {"cat": 3, "dog": 5, "ship": 8}  # folder name: CIFAR-10 label
# Each split's photos cycle through these (mode, format): the modes an image folder may hold.
KINDS = [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGB", "PNG"), ("L", "PNG")]
SPLIT_SIZES = {"train": 15, "validation": 7, "test": 5}
BROKEN = Path("train") / "dog" / "broken.jpg"


def cifar_images(cifar10_dir: Path, label: int, count: int) -> list[Image.Image]:
    """The first COUNT CIFAR-10 test images of one class."""
    rows = pq.read_table(cifar10_dir / "test.parquet").slice(0, 400).to_pylist()
    images = [Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB") for row in rows if row["label"] == label]
    return images[:count]


def write_photo_folder(root: Path, cifar10_dir: Path, broken: bool) -> Path:
    """An imagefolder (split/class/photo) of photos 24-160 px wide and high, of every kind in KINDS; with BROKEN, a
    file that is no image among the training photos (16 training rows either way, for 2 batches of 8 an epoch)."""
    rng = np.random.default_rng(0)
    pool = {name: cifar_images(cifar10_dir, label, sum(SPLIT_SIZES.values())) for name, label in CLASSES.items()}
    for split, size in SPLIT_SIZES.items():
        for i in range(size + (split == "train" and not broken)):
            name = list(CLASSES)[i % len(CLASSES)]
            mode, kind = KINDS[i % len(KINDS)]
            width, height = (int(side) for side in rng.integers(24, 161, 2))
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            photo = pool[name].pop().resize((width, height), Image.BICUBIC).convert(mode)
            photo.save(folder / f"{i:02d}.{kind.lower()}", kind)
    if broken:
        (root / BROKEN).write_bytes(b"not a JPEG")
    return root


def photo_recipe(cifar10_dir: Path, folder: Path, out: Path, **data) -> dict:
    """tiny_recipe's ViT and schedule on a photo folder: 4 updates of 8, i.e. 2 epochs of its 16 training rows."""
    source = {"path": "imagefolder", "data_dir": str(folder), "cache_dir": str(out.parent / "datasets_cache")}
    return tiny_recipe(
        cifar10_dir,
        out,
        data={
            "dataset": source, "train_split": "train", "eval_split": "validation", "test_split": "test",
            "augment": {"crop_scale": [0.3, 1.0], "hflip": True}, "bad_images": "skip", **data,
        },
        schedule={"name": "cosine", "warmup_steps": 1, "total_steps": 4},
        train={"global_batch_size": 8, "micro_batch_size": 8, "eval_batch_size": 3, "eval_every": 2, "log_every": 1},
    )  # fmt: skip


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header declares WIDTH x HEIGHT (its CRC fixed): Pillow refuses it at open, decoding nothing."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR's data starts after the signature, length and type
    png[29:33] = struct.pack(">I", zlib.crc32(png[12:29]))
    return bytes(png)
