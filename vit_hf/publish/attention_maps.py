"""Where the model looks: attention rollout maps (Abnar and Zuidema, 2020, "Quantifying Attention Flow in
Transformers", https://arxiv.org/abs/2005.00928), the figures `python -m vit_hf.attention` saves, and pictures of
predictions for TensorBoard.

From a training loop (plain uint8 pictures for TensorBoard; matplotlib is imported only when they are drawn):

    maps = attention_rollout(model, pixel_values)
    overlay = rollout_overlay(pixels_to_images(pixel_values)[0], maps[0])
    writer.add_image("attention/0", overlay, step, dataformats="HWC")
    writer.add_image("predictions", prediction_grid(images, labels, predictions, class_names), step, dataformats="HWC")
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from transformers import ViTForImageClassification


def rollout(attentions: Sequence[Tensor]) -> Tensor:
    """Attention rollout of per-layer weights (B, heads, T, T), first layer first: (B, T, T), rows summing to 1.

    Each layer's weights are averaged over heads, the identity is added for the residual connection and the rows
    are renormalised; the layers are then composed in order, rollout = A_L @ ... @ A_1.
    """
    result = None
    for weights in attentions:
        layer = weights.float().mean(dim=1)
        layer = layer + torch.eye(layer.shape[-1], device=layer.device)
        layer = layer / layer.sum(dim=-1, keepdim=True)
        result = layer if result is None else layer @ result
    return result


@torch.no_grad()
def attention_rollout(model: ViTForImageClassification, pixel_values: Tensor) -> Tensor:
    """How much the class token draws on each patch, through all layers: (B, grid, grid), on the model's device.

    Works whatever attention kernel the model was loaded with: it switches to eager attention for the call
    (the fused kernels do not return the weights) and back, and runs in eval mode.
    """
    kernel, was_training = model.config._attn_implementation, model.training
    model.set_attn_implementation("eager")
    model.eval()
    try:
        outputs = model(pixel_values.to(model.device, model.dtype), output_attentions=True)
    finally:
        model.set_attn_implementation(kernel)
        model.train(was_training)
    class_row = rollout(outputs.attentions)[:, 0, 1:]
    grid = math.isqrt(class_row.shape[-1])
    return class_row.reshape(-1, grid, grid)


def pixels_to_images(pixel_values: Tensor) -> np.ndarray:
    """Model inputs (B, 3, H, W) scaled to [-1, 1] (this project's preprocessing) back to (B, H, W, 3) uint8."""
    pixels = ((pixel_values.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def rollout_figure(image: np.ndarray | Image.Image, rollout_map: Tensor | np.ndarray, title: str):
    """The image, and the image under its rollout heat map, side by side: a matplotlib Figure for `savefig`.

    The (grid, grid) map is stretched over the whole image, as the model's resize squashed the image onto its grid.
    """
    from matplotlib.figure import Figure  # imported when a figure is drawn, not with the module

    image = np.asarray(image)
    height, width = image.shape[:2]
    heat = torch.as_tensor(rollout_map).float().cpu().numpy()
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.imshow(image)
    right.imshow(image)
    right.imshow(
        heat / heat.max(),
        cmap="jet",
        alpha=0.5,
        vmin=0,
        vmax=1,
        interpolation="bilinear",
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),
    )
    left.set_title("image", fontsize=9)
    right.set_title("attention rollout", fontsize=9)
    for axes in (left, right):
        axes.axis("off")
    figure.suptitle(title)
    return figure


def rollout_overlay(image: np.ndarray | Image.Image, rollout_map: Tensor | np.ndarray) -> np.ndarray:
    """The image, and the image under its rollout heat map (jet, half transparent), side by side: an (H, 2W, 3) uint8
    array for `writer.add_image(..., dataformats="HWC")`. The map is stretched bilinearly over the whole image."""
    from matplotlib import colormaps  # imported when the pictures are drawn, at the end of a run

    image = np.asarray(image)
    heat = torch.as_tensor(rollout_map).float().cpu()[None, None]
    heat = torch.nn.functional.interpolate(heat, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    heat = (heat / heat.max()).numpy()
    blended = 0.5 * image / 255 + 0.5 * colormaps["jet"](heat)[..., :3]
    return np.concatenate([image, (blended * 255).round().astype(np.uint8)], axis=1)


def prediction_grid(
    images: Sequence[np.ndarray | Image.Image],
    labels: Sequence[int],
    predictions: Sequence[int],
    class_names: Sequence[str],
    columns: int = 8,
    tile: int = 96,
) -> np.ndarray:
    """Images in a grid captioned with their predicted class, green when right, red with the true class when wrong.

    Returns an (H, W, 3) uint8 array on white, for `writer.add_image(..., dataformats="HWC")`; drawn with PIL.
    """
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    caption = 26  # two lines of PIL's default font
    canvas = Image.new("RGB", (columns * (tile + 4), rows * (tile + caption + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, label, predicted) in enumerate(zip(images, labels, predictions, strict=True)):
        left, top = (i % columns) * (tile + 4) + 2, (i // columns) * (tile + caption + 4) + 2
        picture = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
        canvas.paste(picture.convert("RGB").resize((tile, tile), Image.BILINEAR), (left, top))
        right = int(label) == int(predicted)
        text = class_names[predicted] if right else f"{class_names[predicted]}\n(true: {class_names[label]})"
        draw.multiline_text((left, top + tile + 1), text, fill=(0, 128, 0) if right else (200, 0, 0), spacing=1)
    return np.asarray(canvas).copy()
