"""An ONNX folder as a torch module with a `config` and `.logits` outputs, for code written for the PyTorch classifier
(evaluation over a split: `vit_hf.training.validation`), and `load_classifier` that picks by the folder's contents."""

import os
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification
from transformers.modeling_outputs import ImageClassifierOutput

from vit_hf.publish.model_dir import load_model_dir
from vit_hf.serving.backends import folder_kind
from vit_hf.serving.onnx_backend import OnnxBackend


class OnnxClassifier(torch.nn.Module):
    """ONNX Runtime behind the classifier's call: `model(pixel_values=...)` gives `.logits` on the input's device."""

    def __init__(self, model_dir: str | os.PathLike):
        super().__init__()
        self.backend = OnnxBackend(model_dir)
        self.config = ViTConfig.from_pretrained(model_dir)

    def forward(self, pixel_values: torch.Tensor) -> ImageClassifierOutput:
        logits = self.backend.logits(pixel_values.detach().float().cpu().numpy())
        return ImageClassifierOutput(logits=torch.from_numpy(logits).to(pixel_values.device))


def load_classifier(model_dir: str | os.PathLike) -> ViTForImageClassification | OnnxClassifier:
    """The classifier of a PyTorch or an ONNX model folder; a one-line UserError where it is neither."""
    if folder_kind(model_dir) == "onnx":
        return OnnxClassifier(Path(model_dir))
    return load_model_dir(model_dir)
