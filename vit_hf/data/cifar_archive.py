"""The original CIFAR-10/100 python archives (`data.dataset: {"cifar_archive": ...}`), read into the Hub's schema."""

import importlib
import io
import pickle
import tarfile
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

from vit_hf.data.messages import one_line
from vit_hf.utils.errors import UserError

# The original CIFAR python archives: the pickles of each split, and for each label column of the Hub's schema the
# key of its labels in a batch and of its class names in the meta pickle.
CIFAR_LAYOUTS = {
    "batches.meta": {
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels": {"label": (b"labels", b"label_names")},
    },
    "meta": {
        "train": ["train"],
        "test": ["test"],
        "labels": {
            "fine_label": (b"fine_labels", b"fine_label_names"),
            "coarse_label": (b"coarse_labels", b"coarse_label_names"),
        },
    },
}


# What the CIFAR batches pickle besides dicts, lists, bytes and numbers: numpy arrays. The official archives (Python
# 2) name numpy.core, which numpy 2 calls numpy._core; Python 3's protocol 2 pickles bytes through _codecs.encode,
# and protocol 5 arrays through _frombuffer.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle that names something a CIFAR batch never holds."""


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that loads only what a CIFAR batch holds: a pickle can call any function it names, so a
    doctored archive could run code as it is read; anything outside _ALLOWED_GLOBALS is refused before it is looked
    up, let alone called."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        if module.startswith("numpy.core."):
            try:  # numpy 2's name for it: numpy.core warns that it is deprecated
                return getattr(importlib.import_module(module.replace("numpy.core.", "numpy._core.")), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def read_cifar_archive(path: Path) -> datasets.DatasetDict:
    """The train and test splits of an original CIFAR-10/100 python archive, in the schema of the Hub's copies."""
    if not path.is_file():
        raise UserError(f"CIFAR archive {str(path)!r} not found")
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = {Path(member.name).name: member for member in archive.getmembers() if member.isfile()}
            meta_name = next((name for name in CIFAR_LAYOUTS if name in members), None)
            if meta_name is None:
                raise UserError(f"{path.name} is not a CIFAR python archive: it has no batches.meta or meta file")
            layout = CIFAR_LAYOUTS[meta_name]
            missing = [name for name in layout["train"] + layout["test"] if name not in members]
            if missing:
                raise UserError(f"CIFAR archive {path.name} lacks {', '.join(missing)}")

            def unpickle(name: str) -> dict:
                # The official archives are Python 2 pickles with bytes keys.
                try:
                    return _CifarUnpickler(archive.extractfile(members[name]), encoding="bytes").load()
                except _RefusedGlobal as error:
                    raise UserError(
                        f"CIFAR archive {path.name}: {name} pickles {error}, which no CIFAR batch holds: refused "
                        "unread (only dicts, lists, bytes, numbers and numpy arrays are loaded)"
                    ) from error

            meta = unpickle(meta_name)
            batches = {split: [unpickle(name) for name in layout[split]] for split in ("train", "test")}
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise UserError(f"cannot read CIFAR archive {path.name}: {one_line(error)}") from error
    features = datasets.Features(
        {
            "img": datasets.Image(),
            **{
                column: datasets.ClassLabel(names=[name.decode() for name in meta[names_key]])
                for column, (_, names_key) in layout["labels"].items()
            },
        }
    )
    return datasets.DatasetDict(
        {split: _cifar_dataset(split_batches, layout, features) for split, split_batches in batches.items()}
    )


def _cifar_dataset(batches: list[dict], layout: dict, features: datasets.Features) -> datasets.Dataset:
    # Rows are 3072 bytes: the red, green and blue 32x32 planes, each row-major.
    pixels = np.concatenate([batch[b"data"] for batch in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = {
        column: np.concatenate([batch[labels_key] for batch in batches])
        for column, (labels_key, _) in layout["labels"].items()
    }
    images = [{"bytes": _bmp(image), "path": None} for image in pixels]
    return datasets.Dataset.from_dict({"img": images, **labels}, features=features)


def _bmp(pixels: np.ndarray) -> bytes:
    # BMP is lossless and uncompressed: far quicker to encode than PNG, for the 60,000 images of an archive.
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="BMP")
    return buffer.getvalue()
