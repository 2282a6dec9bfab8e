"""The figures that show an export is still the model: the fp32 graph's logits against PyTorch's, and the int8
graph's top-1 agreement with the fp32 graph and the accuracy of both."""

import numpy as np
import torch
from transformers import ViTForImageClassification

from vit_hf.serving.onnx_backend import INPUT_NAME, OUTPUT_NAME
from vit_hf.serving.verify_inputs import Inputs
from vit_hf.utils.errors import UserError

# The largest difference allowed between the fp32 graph's logits and PyTorch's, on any image and class.
FP32_TOLERANCE = 1e-4


def run_session(session, pixel_values: np.ndarray) -> np.ndarray:
    """The logits of an ONNX Runtime session for a batch of pixel values."""
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(pixel_values, dtype=np.float32)})[0]


def check_classes(labels: list[str], inputs: Inputs, model_dir: str) -> None:
    """Refuse data whose classes are not the model's, in the same order: its accuracy would mean nothing."""
    if inputs.class_names is not None and inputs.class_names != labels:
        raise UserError(
            f"the classes of model {model_dir} ({len(labels)}: {', '.join(labels[:10])}) are not those of the data "
            f"({len(inputs.class_names)}: {', '.join(inputs.class_names[:10])}), in the same order"
        )


def logit_gap(model: ViTForImageClassification, session, inputs: Inputs) -> float:
    """The largest absolute difference between the session's logits and MODEL's over INPUTS (inf where not finite)."""
    gap = 0.0
    with torch.inference_mode():
        for pixel_values, _ in inputs.batches():
            expected = model(pixel_values=torch.from_numpy(pixel_values)).logits.float().numpy()
            difference = np.abs(run_session(session, pixel_values) - expected)
            if not np.isfinite(difference).all():
                return float("inf")
            gap = max(gap, float(difference.max()))
    return gap


def int8_figures(fp32_session, int8_session, inputs: Inputs) -> dict:
    """Top-1 agreement of the int8 graph with the fp32 graph over INPUTS, and with labels the accuracy of both."""
    images = agreeing = right_fp32 = right_int8 = 0
    for pixel_values, labels in inputs.batches():
        fp32 = run_session(fp32_session, pixel_values).argmax(axis=-1)
        int8 = run_session(int8_session, pixel_values).argmax(axis=-1)
        images += len(fp32)
        agreeing += int((fp32 == int8).sum())
        if labels is not None:
            right_fp32 += int((fp32 == labels).sum())
            right_int8 += int((int8 == labels).sum())
    figures = {"inputs": inputs.description, "images": images, "top1_agreement": agreeing / images}
    if not inputs.labelled:
        return figures | {"accuracy_fp32": None, "accuracy_int8": None, "accuracy_points_lost": None}
    accuracy_fp32, accuracy_int8 = right_fp32 / images, right_int8 / images
    lost = round(100 * (accuracy_fp32 - accuracy_int8), 4)
    return figures | {"accuracy_fp32": accuracy_fp32, "accuracy_int8": accuracy_int8, "accuracy_points_lost": lost}
