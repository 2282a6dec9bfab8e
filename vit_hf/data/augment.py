"""Batched image augmentations that run on the training device: RandAugment and TrivialAugmentWide (random
erasing, Mixup/CutMix and label smoothing: `vit_hf.data.mixing`), and a PNG preview grid to look at what they do.

Every op works on a whole batch (B, 3, H, W) at once, draws its random choices per sample, and takes an
optional `torch.Generator` so that a seed fixes the result. RandAugment and TrivialAugmentWide take images
in [0, 1] (before normalisation); random erasing and Mixup/CutMix take the normalised images.

Nothing here reads a tensor back to the host or copies one to the device: each random choice is a tensor
drawn from the generator and applied with masks (`torch.where`), so a GPU's queue never drains mid-update.
Each op of a policy runs on the whole batch and every sample keeps the result of the op it drew.

Magnitudes follow torchvision's RandAugment and TrivialAugmentWide (31 bins, random signs for the geometric
and the enhancement ops); the colour ops match Pillow's ImageOps/ImageEnhance, which those tables were made for.
"""

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from vit_hf.data.random_draws import integers, uniform

NUM_MAGNITUDE_BINS = 31
# Grey becomes 0 after normalisation to [-1, 1], so the corners a rotation or shear uncovers carry no signal.
FILL = 0.5

Op = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------------------
# Colour ops: fn(images in [0, 1] (n, 3, H, W), magnitudes (n,)) -> images in [0, 1]
# ---------------------------------------------------------------------------------------------------------


def _per_sample(magnitudes: Tensor, images: Tensor) -> Tensor:
    """Magnitudes (n,) as (n, 1, 1, 1) in the images' dtype, to broadcast over each sample."""
    return magnitudes.to(images.dtype).view(-1, 1, 1, 1)


def _blend(images: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """Pillow's ImageEnhance: factor 0 gives `degenerate`, 1 the image, above 1 extrapolates away from it."""
    return (degenerate + factor * (images - degenerate)).clamp(0, 1)


def _grey(images: Tensor) -> Tensor:
    """Luma (n, 1, H, W) with the ITU-R 601-2 weights of Pillow's convert("L")."""
    red, green, blue = images.unbind(1)
    return (0.299 * red + 0.587 * green + 0.114 * blue).unsqueeze(1)


def _levels(images: Tensor) -> Tensor:
    """Images in [0, 1] as the integer levels 0..255 (still floats) that Pillow's ops are defined on."""
    # Clamped because a bicubic resize upstream can overshoot [0, 1], and the levels index histograms.
    return (images.clamp(0, 1) * 255).round()


def _mean_grey(images: Tensor) -> Tensor:
    """Each image's mean luma (n, 1, 1, 1)."""
    return _grey(images).mean(dim=(-3, -2, -1), keepdim=True)


def _smooth(images: Tensor) -> Tensor:
    """Pillow's SMOOTH filter (the 8 neighbours weigh 1, the centre 5, over 13); like Pillow, it leaves the
    one-pixel border as it was."""
    # A 3x3 sum as a sum over rows then over columns: cheaper than a convolution, and no kernel to copy over.
    rows = images[..., :-2, :] + images[..., 1:-1, :] + images[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    smooth = images.clone()
    smooth[..., 1:-1, 1:-1] = (box + 4 * images[..., 1:-1, 1:-1]) / 13
    return smooth


# Pillow's ImageEnhance ops by the image each blends with ("degenerate": what factor 0 gives).
DEGENERATES: dict[str, Callable[[Tensor], Tensor]] = {
    "Brightness": torch.zeros_like,
    "Color": _grey,
    "Contrast": _mean_grey,
    "Sharpness": _smooth,
}


def _enhancement(degenerate: Callable[[Tensor], Tensor]) -> Op:
    """The ImageEnhance op with factor 1 + magnitude that blends with degenerate(images)."""

    def op(images: Tensor, magnitudes: Tensor) -> Tensor:
        return _blend(images, degenerate(images), 1 + _per_sample(magnitudes, images))

    return op


def identity(images: Tensor, magnitudes: Tensor) -> Tensor:
    """The images unchanged."""
    return images


def posterize(images: Tensor, magnitudes: Tensor) -> Tensor:
    """ImageOps.posterize: keep the `magnitude` (rounded) highest bits of each 8-bit value."""
    step = 2 ** (8 - _per_sample(magnitudes, images).round())
    return (_levels(images) / step).floor() * step / 255


def solarize(images: Tensor, magnitudes: Tensor) -> Tensor:
    """ImageOps.solarize: invert every value at or above the threshold `magnitude` (in [0, 1])."""
    return torch.where(images >= _per_sample(magnitudes, images), 1 - images, images)


def auto_contrast(images: Tensor, magnitudes: Tensor) -> Tensor:
    """ImageOps.autocontrast: stretch each channel to span [0, 1]; a flat channel stays as it is."""
    low = images.amin(dim=(-2, -1), keepdim=True)
    high = images.amax(dim=(-2, -1), keepdim=True)
    flat = high <= low
    low = torch.where(flat, 0.0, low)
    scale = torch.where(flat, 1.0, 1 / (high - low))
    return ((images - low) * scale).clamp(0, 1)


def equalize(images: Tensor, magnitudes: Tensor) -> Tensor:
    """ImageOps.equalize: per-channel histogram equalisation of the 8-bit values (Pillow's lookup table)."""
    n, channels, height, width = images.shape
    levels = _levels(images).long().flatten(2)
    # A scatter, not bincount: bincount reads the largest value back to the host to size its output.
    histogram = levels.new_zeros(n, channels, 256).scatter_add_(2, levels, torch.ones_like(levels))
    brightest_count = histogram.gather(2, levels.amax(dim=2, keepdim=True))
    step = torch.div(height * width - brightest_count, 255, rounding_mode="floor")
    darker = histogram.cumsum(2) - histogram
    table = torch.div(darker + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1), rounding_mode="floor")
    # Pillow leaves a channel with a single value (step 0) as it is.
    table = torch.where(step > 0, table.clamp(max=255), torch.arange(256, device=images.device))
    return (table.gather(2, levels).view_as(images) / 255).to(images.dtype)


# ---------------------------------------------------------------------------------------------------------
# Geometric ops: inverse affine maps (output pixel -> input pixel, about the image centre), one warp
# ---------------------------------------------------------------------------------------------------------


def _affine(magnitudes: Tensor, rows: list[list[Tensor | float]], height: int, width: int) -> Tensor:
    """A 2x3 map per sample (n, 2, 3) in affine_grid's units ([-1, 1] across each side), from a map in pixels
    whose entries are numbers or tensors (n,)."""
    # x / (width / 2) and y / (height / 2) on both sides of the map scale its entries by these.
    to_unit = [[1.0, height / width, 2 / width], [width / height, 1.0, 2 / height]]
    entries = [
        magnitudes.new_full(magnitudes.shape, entry * scale) if isinstance(entry, float) else entry * scale
        for row, row_scales in zip(rows, to_unit, strict=True)
        for entry, scale in zip(row, row_scales, strict=True)
    ]
    return torch.stack(entries, dim=-1).view(-1, 2, 3)


def _shear_x_map(magnitudes: Tensor, height: int, width: int) -> Tensor:
    """Shear factor `magnitude` about the top edge, like torchvision (center=[0, 0]) and Pillow."""
    return _affine(magnitudes, [[1.0, magnitudes, magnitudes * height / 2], [0.0, 1.0, 0.0]], height, width)


def _shear_y_map(magnitudes: Tensor, height: int, width: int) -> Tensor:
    """Shear factor `magnitude` about the left edge."""
    return _affine(magnitudes, [[1.0, 0.0, 0.0], [magnitudes, 1.0, magnitudes * width / 2]], height, width)


def _translate_x_map(magnitudes: Tensor, height: int, width: int) -> Tensor:
    """Shift right by `magnitude` pixels, truncated to whole pixels like torchvision (no blur)."""
    return _affine(magnitudes, [[1.0, 0.0, -magnitudes.trunc()], [0.0, 1.0, 0.0]], height, width)


def _translate_y_map(magnitudes: Tensor, height: int, width: int) -> Tensor:
    """Shift down by `magnitude` pixels, truncated to whole pixels."""
    return _affine(magnitudes, [[1.0, 0.0, 0.0], [0.0, 1.0, -magnitudes.trunc()]], height, width)


def _rotate_map(magnitudes: Tensor, height: int, width: int) -> Tensor:
    """Rotate counter-clockwise by `magnitude` degrees about the centre."""
    cos, sin = torch.deg2rad(magnitudes).cos(), torch.deg2rad(magnitudes).sin()
    return _affine(magnitudes, [[cos, -sin, 0.0], [sin, cos, 0.0]], height, width)


AFFINE_MAPS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "ShearX": _shear_x_map,
    "ShearY": _shear_y_map,
    "TranslateX": _translate_x_map,
    "TranslateY": _translate_y_map,
    "Rotate": _rotate_map,
}


def warp(images: Tensor, maps: Tensor) -> Tensor:
    """Resample each image through its inverse affine map (n, 2, 3), in affine_grid's units about the image
    centre; pixels from outside the image take the grey FILL. Bilinear."""
    grid = F.affine_grid(maps, list(images.shape), align_corners=False)
    # Sampling around FILL with zero padding makes the outside FILL, blended bilinearly at the border.
    shifted = F.grid_sample(images - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (shifted + FILL).clamp(0, 1)


def _geometric_op(affine_map: Callable[[Tensor, int, int], Tensor]) -> Op:
    """The op that warps each image through affine_map(magnitudes, height, width)."""

    def op(images: Tensor, magnitudes: Tensor) -> Tensor:
        return warp(images, affine_map(magnitudes.to(images.dtype), *images.shape[-2:]))

    return op


# The colour ops that are not ImageEnhance blends.
OTHER_COLOUR_OPS: dict[str, Op] = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Solarize": solarize,
    "Posterize": posterize,
}
# Every op by name, fn(images (n, 3, H, W) in [0, 1], magnitudes (n,)), to test and preview them one by one.
OPS: dict[str, Op] = (
    OTHER_COLOUR_OPS
    | {name: _enhancement(degenerate) for name, degenerate in DEGENERATES.items()}
    | {name: _geometric_op(affine_map) for name, affine_map in AFFINE_MAPS.items()}
)
# RandAugment's and TrivialAugmentWide's op set (all of OPS), in the order draw_ops indexes it.
OP_NAMES = tuple(OPS)


# ---------------------------------------------------------------------------------------------------------
# RandAugment and TrivialAugmentWide
# ---------------------------------------------------------------------------------------------------------


def _magnitude_ranges(height: int, width: int, wide: bool) -> dict[str, tuple[float, float, bool]]:
    """Each op's magnitude at the first and at the last bin, and whether it takes a random sign:
    torchvision's RandAugment table, or (wide) its TrivialAugmentWide table."""
    shear, enhance, degrees, fewest_bits = (0.99, 0.99, 135.0, 2.0) if wide else (0.3, 0.9, 30.0, 4.0)
    shift_x, shift_y = (32.0, 32.0) if wide else (150 / 331 * width, 150 / 331 * height)
    return {
        "Identity": (0.0, 0.0, False),
        "ShearX": (0.0, shear, True),
        "ShearY": (0.0, shear, True),
        "TranslateX": (0.0, shift_x, True),
        "TranslateY": (0.0, shift_y, True),
        "Rotate": (0.0, degrees, True),
        "Brightness": (0.0, enhance, True),
        "Color": (0.0, enhance, True),
        "Contrast": (0.0, enhance, True),
        "Sharpness": (0.0, enhance, True),
        "Posterize": (8.0, fewest_bits, False),
        "Solarize": (1.0, 0.0, False),
        "AutoContrast": (0.0, 0.0, False),
        "Equalize": (0.0, 0.0, False),
    }


def check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor of shape (B, 3, H, W), got {tuple(images.shape)} {images.dtype}"
        )


def draw_ops(
    bins: Tensor, height: int, width: int, wide: bool, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One round of choices for bins.shape[0] samples: an op index into OP_NAMES drawn uniformly per
    sample, and its magnitude at the sample's bin (of 31) with a random sign where the op takes one.
    Magnitudes follow torchvision's RandAugment table, or (wide) its TrivialAugmentWide table."""
    ranges = _magnitude_ranges(height, width, wide)
    count = bins.shape[0]
    ops = integers(len(OP_NAMES), (count,), generator, bins.device)
    negative = uniform((count,), generator, bins.device) < 0.5
    # One where per op rather than indexing a table: a table tensor would be a host-to-device copy.
    magnitudes = torch.zeros_like(bins)
    for index, name in enumerate(OP_NAMES):
        first, last, signed = ranges[name]
        size = first + (last - first) * bins / (NUM_MAGNITUDE_BINS - 1)
        magnitudes = torch.where(ops == index, torch.where(negative, -size, size) if signed else size, magnitudes)
    return ops, magnitudes


def apply_ops(images: Tensor, ops: Tensor, magnitudes: Tensor) -> Tensor:
    """Apply op OP_NAMES[ops[i]] at magnitudes[i] to sample i. Each op runs on the whole batch (at every
    sample's magnitude) and a mask keeps it where it was chosen: selecting the samples instead would read the
    mask on the host. The enhancement ops share one blend and the geometric ops one warp."""
    chosen = ops.view(-1, 1, 1, 1)
    magnitudes = magnitudes.to(images.dtype)
    out = degenerate = images
    maps = torch.eye(2, 3, dtype=images.dtype, device=images.device).expand(len(images), 2, 3)
    enhanced = geometric = torch.zeros_like(chosen, dtype=torch.bool)
    for index, name in enumerate(OP_NAMES):
        picked = chosen == index
        if name in AFFINE_MAPS:
            maps = torch.where(picked[..., 0], AFFINE_MAPS[name](magnitudes, *images.shape[-2:]), maps)
            geometric = geometric | picked
        elif name == "Identity":
            continue  # `out` starts as the images
        elif name in DEGENERATES:
            degenerate = torch.where(picked, DEGENERATES[name](images), degenerate)
            enhanced = enhanced | picked
        else:
            # Where another op was chosen, this op's result at that op's magnitude may be anything, even NaN:
            # the mask drops it.
            out = torch.where(picked, OTHER_COLOUR_OPS[name](images, magnitudes), out)
    out = torch.where(enhanced, _blend(images, degenerate, 1 + _per_sample(magnitudes, images)), out)
    return torch.where(geometric, warp(images, maps), out)


def rand_augment(
    images: Tensor, num_ops: int = 2, magnitude: int = 9, generator: torch.Generator | None = None
) -> Tensor:
    """RandAugment (Cubuk et al. 2020) on images (B, 3, H, W) in [0, 1]: each sample applies `num_ops` ops
    of its own choosing, at bin `magnitude` of 31, with its own signs."""
    check_images(images)
    if not 0 <= magnitude < NUM_MAGNITUDE_BINS:
        raise ValueError(f"magnitude must be in 0..{NUM_MAGNITUDE_BINS - 1}, got {magnitude}")
    if num_ops < 0:
        raise ValueError(f"num_ops must be >= 0, got {num_ops}")
    bins = torch.full((images.shape[0],), float(magnitude), device=images.device)
    for _ in range(num_ops):
        images = apply_ops(images, *draw_ops(bins, *images.shape[-2:], wide=False, generator=generator))
    return images


def trivial_augment(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """TrivialAugmentWide (Müller & Hutter 2021) on images (B, 3, H, W) in [0, 1]: each sample applies one
    op of its own choosing at a magnitude bin drawn uniformly from the 31 wide bins."""
    check_images(images)
    bins = integers(NUM_MAGNITUDE_BINS, (images.shape[0],), generator, images.device).float()
    return apply_ops(images, *draw_ops(bins, *images.shape[-2:], wide=True, generator=generator))


# ---------------------------------------------------------------------------------------------------------
# Preview
# ---------------------------------------------------------------------------------------------------------


def save_preview_grid(images: Tensor, path: str | Path, nrow: int = 8) -> None:
    """Write images (B, 3, H, W) as a PNG grid of `nrow` images a row with 2-pixel white gutters. Values are
    taken as [0, 1], or as [-1, 1] when any is negative (normalised images); outside values are clipped."""
    check_images(images)
    images = images.detach().float().cpu()
    if images.min() < 0:
        images = (images + 1) / 2
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    count, _, height, width = pixels.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    gutter = 2
    grid = torch.full(
        (3, rows * (height + gutter) + gutter, columns * (width + gutter) + gutter), 255, dtype=torch.uint8
    )
    for index, image in enumerate(pixels):
        row, column = divmod(index, columns)
        top, left = gutter + row * (height + gutter), gutter + column * (width + gutter)
        grid[:, top : top + height, left : left + width] = image
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path, format="PNG")
