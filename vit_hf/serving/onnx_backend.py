"""An ONNX folder (model.onnx beside config.json and preprocessor_config.json) in ONNX Runtime, its graph checked
against its config when it loads. Imports neither torch nor transformers."""

import json
import os
from pathlib import Path

import numpy as np

from vit_hf.data.messages import one_line
from vit_hf.utils.errors import UserError

ONNX_FILE = "model.onnx"
CONFIG_FILE = "config.json"
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime session of the file at PATH (the GPU's provider first where there is one); a one-line
    UserError where ONNX Runtime is missing or the file cannot be loaded."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"{path}: an ONNX model needs ONNX Runtime: pip install 'vit-hf[onnx]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its optimisation notes are not for the user
    if threads:
        options.intra_op_num_threads = threads
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [name for name in wanted if name in onnxruntime.get_available_providers()]
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # ONNX Runtime's load errors (Fail, InvalidProtobuf, ...) share no narrower base
        raise UserError(f"{path}: cannot be loaded by ONNX Runtime ({one_line(error)})") from None


def read_config(path: Path) -> dict:
    """config.json as a dict, with the fields serving needs; a one-line UserError naming the file or field."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot be read ({one_line(error)})") from None
    for field in ("id2label", "image_size"):
        if field not in config:
            raise UserError(f"{path}: no {field} (not a ViT classifier's config)")
    return config


def labels_of(config: dict) -> list[str]:
    """The class names of a config.json's id2label, in class order."""
    return [config["id2label"][str(i)] for i in range(len(config["id2label"]))]


def check_graph(session, path: Path, config: dict) -> None:
    """Refuse an ONNX graph that does not take this config's images or give its classes, in one line."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
        names = ", ".join(i.name for i in inputs), ", ".join(o.name for o in outputs)
        raise UserError(f"{path}: takes ({names[0]}) and gives ({names[1]}), not {INPUT_NAME} and {OUTPUT_NAME}")
    batch, *image = inputs[0].shape
    size, channels = config["image_size"], config.get("num_channels", 3)
    if image != [channels, size, size]:
        shown = "x".join(str(n) for n in image)
        raise UserError(
            f"{path}: takes {shown} images, but {CONFIG_FILE} has image_size {size} ({channels}x{size}x{size})"
        )
    if isinstance(batch, int):
        raise UserError(f"{path}: its batch axis is fixed at {batch}; export it with python -m vit_hf.onnx")
    classes = next(o for o in outputs if o.name == OUTPUT_NAME).shape[-1]
    if classes != len(config["id2label"]):
        raise UserError(f"{path}: gives {classes} classes, but {CONFIG_FILE}'s id2label has {len(config['id2label'])}")


class OnnxBackend:
    """Logits of an ONNX folder's model for float32 pixel values (B, 3, S, S)."""

    kind = "onnx"

    def __init__(self, model_dir: str | os.PathLike, threads: int | None = None):
        self.model_dir = Path(model_dir)
        self.config = read_config(self.model_dir / CONFIG_FILE)
        self.labels = labels_of(self.config)
        self.image_size = int(self.config["image_size"])
        self.session = onnx_session(self.model_dir / ONNX_FILE, threads)
        check_graph(self.session, self.model_dir / ONNX_FILE, self.config)

    def logits(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: pixel_values})[0]
