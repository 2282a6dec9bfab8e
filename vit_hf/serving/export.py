"""A PyTorch classifier as an ONNX graph with a dynamic batch axis (torch.onnx's dynamo exporter; optimum does not
support transformers 5), and the dynamic int8 quantization of such a graph (ONNX Runtime)."""

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import ViTForImageClassification

from vit_hf.serving.onnx_backend import INPUT_NAME, OUTPUT_NAME
from vit_hf.utils.errors import UserError

# The [onnx] extra: torch.onnx's dynamo exporter writes through onnxscript; ONNX Runtime runs and quantizes.
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# The protobuf limit: a larger model's weights go in a file beside the graph.
SINGLE_FILE_BYTES = 1_800_000_000


def check_export_packages() -> None:
    """A one-line UserError naming the packages of the [onnx] extra that are not installed."""
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"the ONNX export needs {', '.join(missing)}: pip install 'vit-hf[onnx]'")


class _Logits(torch.nn.Module):
    """The classifier as a function of pixel values alone, returning the logits tensor (no output dataclass)."""

    def __init__(self, model: ViTForImageClassification):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' and the quantizer's notes (deprecations, optional packages, advice) for the block:
    stderr is for the user's errors."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir", "")]
    levels = [logger.level for logger in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(model: ViTForImageClassification, path: Path) -> None:
    """Write MODEL's graph to PATH: input pixel_values (batch, C, S, S) in float32, output logits (batch, classes)."""
    config = model.config
    example = torch.zeros(2, config.num_channels, config.image_size, config.image_size)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > SINGLE_FILE_BYTES
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            _Logits(model.float().cpu().eval()).eval(),
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: batch}},
            verbose=False,
        )
        program.save(str(path), external_data=large)


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of the ONNX graph at SOURCE into TARGET: int8 weights, one scale per output channel
    (what keeps the accuracy), activations quantized on the fly; no calibration data."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # the [onnx] extra, needed only here

    with _quiet():
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
