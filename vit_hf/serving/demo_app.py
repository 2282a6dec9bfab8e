"""The demo page of a model folder (`python -m vit_hf.demo`): a Gradio app, the Hugging Face way of showing a model
(Spaces). An upload gets its top-5 classes with their scores and the attention rollout over the image; the same
function answers `gradio_client` as api_name="/predict".

An ONNX graph gives logits only, not the attention weights the rollout is made of: for an ONNX folder the rollout
comes from a PyTorch folder given beside it (the folder it was exported from), or the page says it is left out.
"""

import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vit_hf.serving.backends import Backend
from vit_hf.serving.classify import top_k
from vit_hf.serving.preprocess import Preprocessing
from vit_hf.utils.errors import UserError

SHOWN = 5  # classes on the page
OVERLAY_SIDE = 384  # pixels: the longer side of the picture the rollout is drawn over


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, a port something already listens on (as the server will bind it: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"--port {port}: {host}:{port} is already in use") from None
            raise UserError(f"--port {port}: cannot serve on {host}:{port} ({error.strerror})") from None


def rollout_model(backend: Backend, attention_dir: str | os.PathLike | None):
    """The PyTorch classifier the rollout is computed with: the backend's own, or ATTENTION_DIR's (same classes and
    image size) for an ONNX folder; None where an ONNX folder has none."""
    if attention_dir is None:
        return backend.model if backend.kind == "pytorch" else None
    from vit_hf.serving.torch_backend import TorchBackend  # torch only where a rollout is drawn

    source = TorchBackend(attention_dir)
    if source.labels != backend.labels or source.image_size != backend.image_size:
        raise UserError(
            f"--attention-model {attention_dir}: its classes or image size ({len(source.labels)} classes, "
            f"{source.image_size} px) are not {backend.model_dir}'s ({len(backend.labels)}, {backend.image_size} px)"
        )
    return source.model


def make_predict(backend: Backend, preprocessing: Preprocessing, model=None) -> Callable:
    """The page's function: an image to ({class: score} of the top 5, the rollout picture or None)."""

    def predict(image: Image.Image | None) -> tuple[dict[str, float], np.ndarray | None]:
        if image is None:
            raise UserError("no image: upload one")
        image = ImageOps.exif_transpose(image).convert("RGB")
        pixel_values = preprocessing.pixel_values([preprocessing.resize(image)])
        indices, scores = top_k(backend.logits(pixel_values), SHOWN)
        classes = {backend.labels[i]: score for i, score in zip(indices[0].tolist(), scores[0].tolist(), strict=True)}
        if model is None:
            return classes, None
        import torch

        from vit_hf.publish.attention_maps import attention_rollout, rollout_overlay

        shown = image.copy()
        shown.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE))
        rollout = attention_rollout(model, torch.from_numpy(pixel_values))[0]
        return classes, rollout_overlay(shown, rollout)

    return predict


def build_demo(backend: Backend, preprocessing: Preprocessing, model=None):
    """The Gradio Blocks of the page (analytics off: it reaches nothing outside this machine)."""
    try:
        import gradio as gr  # the [demo] extra, imported when a page is built
    except ImportError:
        raise UserError("the demo needs gradio: pip install 'vit-hf[demo]'") from None

    predict = make_predict(backend, preprocessing, model)

    def on_upload(image):
        try:
            return predict(image)
        except UserError as error:
            raise gr.Error(str(error)) from None

    name = Path(backend.model_dir).resolve().name
    about = f"{backend.kind} model, {len(backend.labels)} classes, {backend.image_size} px input."
    if model is None:
        about += " No attention rollout: an ONNX graph gives no attention weights (start with --attention-model)."
    with gr.Blocks(title=name, analytics_enabled=False) as demo:
        gr.Markdown(f"## {name}\n{about} Upload an image to see its top-{SHOWN} classes and where the model looked.")
        with gr.Row():
            image = gr.Image(type="pil", sources=["upload"], label="image")
            with gr.Column():
                classes = gr.Label(num_top_classes=SHOWN, label=f"top-{SHOWN} classes")
                rollout = gr.Image(
                    type="numpy", label="attention rollout", interactive=False, visible=model is not None
                )
        image.upload(on_upload, inputs=image, outputs=[classes, rollout], api_name="predict")
    return demo
