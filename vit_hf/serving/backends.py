"""The model behind a model folder, chosen by what the folder holds: one interface, the logits of a batch.

A PyTorch folder (model.safetensors) runs in torch; an ONNX folder (model.onnx, written by `python -m vit_hf.onnx`) in
ONNX Runtime, without importing torch. Both keep config.json and preprocessor_config.json.
"""

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from vit_hf.serving.onnx_backend import CONFIG_FILE, ONNX_FILE, OnnxBackend
from vit_hf.serving.preprocess import PROCESSOR_FILE, Preprocessing
from vit_hf.utils.errors import UserError

WEIGHTS_FILE = "model.safetensors"


class Backend(Protocol):
    """What serving needs of a model: its classes, its input size and the logits (B, classes) of float32 pixel
    values (B, 3, image_size, image_size)."""

    kind: str  # "pytorch" or "onnx"
    model_dir: Path
    labels: list[str]
    image_size: int

    def logits(self, pixel_values: np.ndarray) -> np.ndarray: ...


def folder_kind(model_dir: str | os.PathLike) -> str:
    """ "onnx" for a folder with model.onnx, "pytorch" otherwise (its files are checked when it loads)."""
    model_dir = Path(model_dir)
    has_onnx, has_weights = (model_dir / ONNX_FILE).is_file(), (model_dir / WEIGHTS_FILE).is_file()
    if has_onnx and has_weights:
        raise UserError(
            f"{model_dir}: holds both {WEIGHTS_FILE} and {ONNX_FILE}; keep one (an export has its own folder)"
        )
    if not has_onnx:
        return "pytorch"
    missing = [name for name in (CONFIG_FILE, PROCESSOR_FILE) if not (model_dir / name).is_file()]
    if missing:
        raise UserError(f"{model_dir}: not a model folder (no {', '.join(missing)})")
    return "onnx"


def check_folder(model_dir: str | os.PathLike) -> Path:
    """MODEL_DIR as a Path, once it holds a PyTorch or an ONNX model's files; else a one-line UserError naming what
    it lacks."""
    if folder_kind(model_dir) == "pytorch":
        from vit_hf.publish.model_dir import check_model_dir  # transformers: for PyTorch folders only

        check_model_dir(model_dir)
    return Path(model_dir)


def load_backend(model_dir: str | os.PathLike, bf16: bool = False) -> Backend:
    """The backend of MODEL_DIR's kind; BF16: a PyTorch model under bfloat16 autocast (an ONNX model keeps its own
    precision)."""
    if folder_kind(model_dir) == "onnx":
        if bf16:
            raise UserError(f"{model_dir}: an ONNX folder runs in the precision it was exported in, not bf16")
        return OnnxBackend(model_dir)
    from vit_hf.serving.torch_backend import TorchBackend  # torch and transformers: for PyTorch folders only

    return TorchBackend(model_dir, bf16=bf16)


def load_served(model_dir: str | os.PathLike, bf16: bool = False) -> tuple[Backend, Preprocessing]:
    """MODEL_DIR's backend and its image preprocessing, refused in one line where they disagree on the image size."""
    backend = load_backend(model_dir, bf16)
    preprocessing = Preprocessing.from_folder(model_dir)
    if (preprocessing.height, preprocessing.width) != (backend.image_size, backend.image_size):
        raise UserError(
            f"{Path(model_dir) / PROCESSOR_FILE}: size {preprocessing.height}x{preprocessing.width}, but "
            f"{CONFIG_FILE} has image_size {backend.image_size}"
        )
    return backend, preprocessing
