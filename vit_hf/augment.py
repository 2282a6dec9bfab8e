"""Batched image augmentations that run on the training device: RandAugment, TrivialAugmentWide, random
erasing, Mixup/CutMix, label smoothing, and a PNG preview grid to look at what they do.

Every op works on a whole batch (B, 3, H, W) at once, draws its random choices per sample, and takes an
optional `torch.Generator` so that a seed fixes the result. RandAugment and TrivialAugmentWide take images
in [0, 1] (before normalisation); random erasing and Mixup/CutMix take the normalised images.

Magnitudes follow torchvision's RandAugment and TrivialAugmentWide (31 bins, random signs for the geometric
and the enhancement ops); the colour ops match Pillow's ImageOps/ImageEnhance, which those tables were made for.
"""

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

NUM_MAGNITUDE_BINS = 31
# Grey becomes 0 after normalisation to [-1, 1], so the corners a rotation or shear uncovers carry no signal.
FILL = 0.5
# timm's RandomErasing tries this many boxes per sample before it gives up on one that does not fit.
ERASING_ATTEMPTS = 10

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


def _quantise(images: Tensor) -> Tensor:
    """Images in [0, 1] as integer levels 0..255 (int64), the 8-bit values Pillow's ops are defined on."""
    # Clamped because a bicubic resize upstream can overshoot [0, 1], and the levels index histograms.
    return (images.clamp(0, 1) * 255).round().long()


def identity(images: Tensor, magnitudes: Tensor) -> Tensor:
    """The images unchanged."""
    return images


def brightness(images: Tensor, magnitudes: Tensor) -> Tensor:
    """ImageEnhance.Brightness with factor 1 + magnitude."""
    return _blend(images, torch.zeros_like(images), 1 + _per_sample(magnitudes, images))


def color(images: Tensor, magnitudes: Tensor) -> Tensor:
    """ImageEnhance.Color (saturation) with factor 1 + magnitude."""
    return _blend(images, _grey(images), 1 + _per_sample(magnitudes, images))


def contrast(images: Tensor, magnitudes: Tensor) -> Tensor:
    """ImageEnhance.Contrast with factor 1 + magnitude: blends with the image's mean grey."""
    mean_grey = _grey(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean_grey, 1 + _per_sample(magnitudes, images))


def sharpness(images: Tensor, magnitudes: Tensor) -> Tensor:
    """ImageEnhance.Sharpness with factor 1 + magnitude: blends with Pillow's SMOOTH filter, border kept."""
    kernel = images.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13
    smooth = images.clone()
    # Like Pillow, the 3x3 filter leaves the one-pixel border as it was.
    smooth[..., 1:-1, 1:-1] = F.conv2d(images, kernel.expand(3, 1, 3, 3), groups=3)
    return _blend(images, smooth, 1 + _per_sample(magnitudes, images))


def posterize(images: Tensor, magnitudes: Tensor) -> Tensor:
    """ImageOps.posterize: keep the `magnitude` (rounded) highest bits of each 8-bit value."""
    step = 2 ** (8 - _per_sample(magnitudes, images).round())
    return torch.div(_quantise(images), step, rounding_mode="floor") * step / 255


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
    levels = _quantise(images).flatten(2)
    # One bincount for the whole batch: each (image, channel) counts into its own block of 256 bins.
    offsets = 256 * torch.arange(n * channels, device=images.device).view(n, channels, 1)
    histogram = torch.bincount((levels + offsets).flatten(), minlength=n * channels * 256).view(n, channels, 256)
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


def _affine(magnitudes: Tensor, rows: list[list[Tensor | float]]) -> Tensor:
    """A 2x3 matrix per sample (n, 2, 3) from entries that are numbers or tensors (n,)."""
    n = magnitudes.shape[0]
    entries = [
        torch.as_tensor(entry, dtype=magnitudes.dtype, device=magnitudes.device).expand(n)
        for row in rows
        for entry in row
    ]
    return torch.stack(entries, dim=-1).view(n, 2, 3)


def _shear_x_map(magnitudes: Tensor, height: int, width: int) -> Tensor:
    """Shear factor `magnitude` about the top edge, like torchvision (center=[0, 0]) and Pillow."""
    return _affine(magnitudes, [[1.0, magnitudes, magnitudes * height / 2], [0.0, 1.0, 0.0]])


def _shear_y_map(magnitudes: Tensor, height: int, width: int) -> Tensor:
    """Shear factor `magnitude` about the left edge."""
    return _affine(magnitudes, [[1.0, 0.0, 0.0], [magnitudes, 1.0, magnitudes * width / 2]])


def _translate_x_map(magnitudes: Tensor, height: int, width: int) -> Tensor:
    """Shift right by `magnitude` pixels, truncated to whole pixels like torchvision (no blur)."""
    return _affine(magnitudes, [[1.0, 0.0, -magnitudes.trunc()], [0.0, 1.0, 0.0]])


def _translate_y_map(magnitudes: Tensor, height: int, width: int) -> Tensor:
    """Shift down by `magnitude` pixels, truncated to whole pixels."""
    return _affine(magnitudes, [[1.0, 0.0, 0.0], [0.0, 1.0, -magnitudes.trunc()]])


def _rotate_map(magnitudes: Tensor, height: int, width: int) -> Tensor:
    """Rotate counter-clockwise by `magnitude` degrees about the centre."""
    cos, sin = torch.deg2rad(magnitudes).cos(), torch.deg2rad(magnitudes).sin()
    return _affine(magnitudes, [[cos, -sin, 0.0], [sin, cos, 0.0]])


AFFINE_MAPS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "ShearX": _shear_x_map,
    "ShearY": _shear_y_map,
    "TranslateX": _translate_x_map,
    "TranslateY": _translate_y_map,
    "Rotate": _rotate_map,
}


def warp(images: Tensor, maps: Tensor) -> Tensor:
    """Resample each image through its inverse affine map (n, 2, 3), in pixels about the image centre;
    pixels from outside the image take the grey FILL. Bilinear."""
    height, width = images.shape[-2:]
    # affine_grid wants coordinates in [-1, 1] along each side: rescale the pixel maps.
    to_unit = maps.new_tensor([[1.0, height / width, 2 / width], [width / height, 1.0, 2 / height]])
    grid = F.affine_grid(maps * to_unit, list(images.shape), align_corners=False)
    # Sampling around FILL with zero padding makes the outside FILL, blended bilinearly at the border.
    shifted = F.grid_sample(images - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (shifted + FILL).clamp(0, 1)


def _geometric_op(affine_map: Callable[[Tensor, int, int], Tensor]) -> Op:
    """The op that warps each image through affine_map(magnitudes, height, width)."""

    def op(images: Tensor, magnitudes: Tensor) -> Tensor:
        return warp(images, affine_map(magnitudes.to(images.dtype), *images.shape[-2:]))

    return op


COLOUR_OPS: dict[str, Op] = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Solarize": solarize,
    "Color": color,
    "Posterize": posterize,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
}
# Every op by name, fn(images (n, 3, H, W) in [0, 1], magnitudes (n,)), to test and preview them one by one.
OPS: dict[str, Op] = COLOUR_OPS | {name: _geometric_op(affine_map) for name, affine_map in AFFINE_MAPS.items()}
# RandAugment's and TrivialAugmentWide's op set (all of OPS), in the order draw_ops indexes it.
OP_NAMES = tuple(OPS)


# ---------------------------------------------------------------------------------------------------------
# Random draws
# ---------------------------------------------------------------------------------------------------------


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Draw on the generator's own device, so that a CPU generator also drives images on a GPU."""
    return generator.device if generator is not None else device


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=_draw_device(generator, device)).to(device)


def _integers(high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(high, shape, generator=generator, device=_draw_device(generator, device)).to(device)


def _numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    """A NumPy generator seeded from `generator` (or torch's global CPU one): torch has no Beta sampler that
    takes a generator."""
    device = generator.device if generator is not None else "cpu"
    return np.random.default_rng(torch.randint(2**62, (1,), generator=generator, device=device).item())


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


def _check_images(images: Tensor) -> None:
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
    columns = zip(*(ranges[name] for name in OP_NAMES), strict=True)
    first, last, signed = (torch.tensor(column, device=bins.device) for column in columns)
    count = bins.shape[0]
    ops = _integers(len(OP_NAMES), (count,), generator, bins.device)
    magnitudes = first[ops] + (last - first)[ops] * bins / (NUM_MAGNITUDE_BINS - 1)
    negative = signed[ops] & (_uniform((count,), generator, bins.device) < 0.5)
    return ops, torch.where(negative, -magnitudes, magnitudes)


def apply_ops(images: Tensor, ops: Tensor, magnitudes: Tensor) -> Tensor:
    """Apply op OP_NAMES[ops[i]] at magnitudes[i] to sample i: each colour op on the samples that chose
    it, and all geometric ops together in one affine_grid/grid_sample call."""
    out = images.clone()
    maps = torch.eye(2, 3, dtype=images.dtype, device=images.device).repeat(len(images), 1, 1)
    geometric = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    for index, name in enumerate(OP_NAMES):
        picked = ops == index
        if not picked.any():
            continue
        if name in AFFINE_MAPS:
            maps[picked] = AFFINE_MAPS[name](magnitudes[picked].to(images.dtype), *images.shape[-2:])
            geometric |= picked
        else:
            out[picked] = COLOUR_OPS[name](images[picked], magnitudes[picked])
    if geometric.any():
        out[geometric] = warp(images[geometric], maps[geometric])
    return out


def rand_augment(
    images: Tensor, num_ops: int = 2, magnitude: int = 9, generator: torch.Generator | None = None
) -> Tensor:
    """RandAugment (Cubuk et al. 2020) on images (B, 3, H, W) in [0, 1]: each sample applies `num_ops` ops
    of its own choosing, at bin `magnitude` of 31, with its own signs."""
    _check_images(images)
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
    _check_images(images)
    bins = _integers(NUM_MAGNITUDE_BINS, (images.shape[0],), generator, images.device).float()
    return apply_ops(images, *draw_ops(bins, *images.shape[-2:], wide=True, generator=generator))


# ---------------------------------------------------------------------------------------------------------
# Random erasing
# ---------------------------------------------------------------------------------------------------------


def random_erasing(
    images: Tensor,
    probability: float = 0.25,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> Tensor:
    """Random erasing (Zhong et al. 2020) on normalised images (B, 3, H, W): with `probability` a sample gets
    one rectangle of area fraction in `scale` and aspect ratio (height / width, log-uniform) in `ratio`.

    The rectangle is filled with per-pixel standard normal noise, as timm's mode='pixel' (DeiT's recipe for
    training ViTs from scratch): noise leaves no constant patch for the model to key on. On images in
    [-1, 1] (std about 0.5) the noise is about twice as wide as the image values, as in timm with ViT's
    mean = std = 0.5 normalisation. A sample whose ERASING_ATTEMPTS boxes all overflow the image is left
    as it is, like timm.
    """
    _check_images(images)
    if not 0 <= probability <= 1:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    n, _, height, width = images.shape
    device = images.device
    area = height * width * (scale[0] + (scale[1] - scale[0]) * _uniform((n, ERASING_ATTEMPTS), generator, device))
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * _uniform((n, ERASING_ATTEMPTS), generator, device))
    box_heights = (area * aspect).sqrt().round()
    box_widths = (area / aspect).sqrt().round()
    fits = (box_heights < height) & (box_widths < width)
    first_fit = fits.int().argmax(dim=1, keepdim=True)
    box_height = box_heights.gather(1, first_fit).squeeze(1)
    box_width = box_widths.gather(1, first_fit).squeeze(1)
    top = (_uniform((n,), generator, device) * (height - box_height + 1)).floor()
    left = (_uniform((n,), generator, device) * (width - box_width + 1)).floor()
    erase = fits.any(dim=1) & (_uniform((n,), generator, device) < probability)

    rows = torch.arange(height, device=device)
    columns = torch.arange(width, device=device)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_height)[:, None])
    in_columns = (columns >= left[:, None]) & (columns < (left + box_width)[:, None])
    inside = in_rows[:, None, :, None] & in_columns[:, None, None, :] & erase[:, None, None, None]
    noise = torch.randn(
        images.shape, generator=generator, dtype=images.dtype, device=_draw_device(generator, device)
    ).to(device)
    return torch.where(inside, noise, images)


# ---------------------------------------------------------------------------------------------------------
# Mixup / CutMix and label smoothing
# ---------------------------------------------------------------------------------------------------------


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot float32 rows with label smoothing (timm's convention): 1 - smoothing + smoothing / num_classes
    on the label, smoothing / num_classes elsewhere; each row sums to one."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    return F.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes


def _cutmix_box(lam: float, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's rand_bbox: a box of side sqrt(1 - lam) times the image's, centred anywhere, clipped to it.
    Returns (top, bottom, left, right)."""
    cut_height = int(height * math.sqrt(1 - lam))
    cut_width = int(width * math.sqrt(1 - lam))
    centre_y, centre_x = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(centre_y - cut_height // 2, 0), min(centre_y + cut_height // 2, height)
    left, right = max(centre_x - cut_width // 2, 0), min(centre_x + cut_width // 2, width)
    return top, bottom, left, right


def mixup_cutmix(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) for a batch, like timm's Mixup in 'batch' mode.

    With probability `prob` the batch is mixed with itself reversed, by one lam ~ Beta(alpha, alpha): Mixup
    blends whole images, CutMix pastes a box from the partner and sets lam to the area left unpasted. With
    both alphas > 0 CutMix is chosen with `switch_prob`; an alpha of 0 disables that method (both 0: no
    mixing). Returns the images and soft targets lam * onehot(y) + (1 - lam) * onehot(y reversed), built
    from label-smoothed one-hots, each row summing to one.
    """
    _check_images(images)
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
    for name, value in (("prob", prob), ("switch_prob", switch_prob)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    rng = _numpy_rng(generator)
    if (mixup_alpha == 0 and cutmix_alpha == 0) or rng.random() >= prob:
        return images, targets

    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    partners = images.flip(0)
    if use_cutmix:
        height, width = images.shape[-2:]
        top, bottom, left, right = _cutmix_box(lam, height, width, rng)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = partners[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (height * width)
    else:
        mixed = lam * images + (1 - lam) * partners
    return mixed, lam * targets + (1 - lam) * targets.flip(0)


# ---------------------------------------------------------------------------------------------------------
# Preview
# ---------------------------------------------------------------------------------------------------------


def save_preview_grid(images: Tensor, path: str | Path, nrow: int = 8) -> None:
    """Write images (B, 3, H, W) as a PNG grid of `nrow` images a row with 2-pixel white gutters. Values are
    taken as [0, 1], or as [-1, 1] when any is negative (normalised images); outside values are clipped."""
    _check_images(images)
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
