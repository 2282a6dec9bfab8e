"""The model folder: what `from_pretrained` and `pipeline("image-classification")` load, written atomically and
read back by every command (predict, validate, push, attention, few-shot and the loop's best model)."""

import os
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, BaseImageProcessor, ViTForImageClassification, ViTImageProcessorPil

from vit_hf.utils.errors import UserError
from vit_hf.utils.files import atomic_dir

# The files of a loadable model folder.
MODEL_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")


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


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """MODEL_DIR as a Path, or a one-line UserError naming the model files it lacks."""
    model_dir = Path(model_dir)
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise UserError(f"{model_dir}: not a model folder (no {', '.join(missing)})")
    return model_dir


def load_model_dir(model_dir: str | os.PathLike, attn_implementation: str | None = None) -> ViTForImageClassification:
    """The classifier of a model folder, or a one-line UserError naming the folder and what is wrong with it."""
    model_dir = check_model_dir(model_dir)
    try:
        return ViTForImageClassification.from_pretrained(model_dir, attn_implementation=attn_implementation)
    except (OSError, ValueError) as error:
        raise UserError(f"{model_dir}: cannot be loaded ({' '.join(str(error).split())})") from None


def load_model_and_processor(
    model_dir: str | os.PathLike, attn_implementation: str | None = None
) -> tuple[ViTForImageClassification, BaseImageProcessor]:
    """The model of a model folder, in eval mode on the GPU when there is one, and its image processor."""
    model = load_model_dir(model_dir, attn_implementation)
    try:
        processor = AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise UserError(f"{model_dir}: cannot be loaded ({' '.join(str(error).split())})") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor
