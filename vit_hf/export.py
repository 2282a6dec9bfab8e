"""Writing a model folder that `from_pretrained` and `pipeline("image-classification")` load, atomically."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from transformers import ViTForImageClassification, ViTImageProcessorPil


def image_processor_for(image_size: int) -> ViTImageProcessorPil:
    """The official eval preprocessing: bilinear resize to the model's size, then [0, 255] -> [-1, 1].

    The PIL backend needs no torchvision; it saves as `ViTImageProcessor`, so users who have torchvision
    get the default backend from the same file.
    """
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=Image.Resampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside OUT_DIR that replaces OUT_DIR only if the block completes.

    A failure or a kill leaves OUT_DIR as it was (a stale `.tmp-*` sibling at worst), never half-written.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(retired / out_dir.name)
            staging.rename(out_dir)
            shutil.rmtree(retired)
        else:
            staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def save_model_dir(
    model: ViTForImageClassification, out_dir: str | os.PathLike, state_dict: dict | None = None
) -> Path:
    """Write model.safetensors, config.json and preprocessor_config.json into OUT_DIR, atomically."""
    with atomic_dir(out_dir) as staging:
        write_model_files(model, staging, state_dict)
    return Path(out_dir)


def write_model_files(model: ViTForImageClassification, folder: Path, state_dict: dict | None = None) -> None:
    """The files of a loadable model folder, written into an existing FOLDER (STATE_DICT: gathered weights)."""
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    image_processor_for(model.config.image_size).save_pretrained(folder)
