"""A PyTorch model folder (model.safetensors) in torch: in eval mode, on the GPU where there is one, in float32 or
under bfloat16 autocast."""

import os
from pathlib import Path

import numpy as np
import torch

from vit_hf.publish.model_dir import load_model_dir


class TorchBackend:
    """Logits of a PyTorch folder's model for float32 pixel values (B, 3, S, S); `model` is the classifier itself."""

    kind = "pytorch"

    def __init__(self, model_dir: str | os.PathLike, bf16: bool = False, attn_implementation: str | None = None):
        self.model_dir = Path(model_dir)
        model = load_model_dir(model_dir, attn_implementation)
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.image_size = int(model.config.image_size)
        self.bf16 = bf16

    @torch.inference_mode()
    def logits(self, pixel_values: np.ndarray) -> np.ndarray:
        device = self.model.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(pixel_values=torch.from_numpy(pixel_values).to(device)).logits
        return logits.float().cpu().numpy()
