"""Augmentations of normalised batches and their targets: random erasing, Mixup/CutMix and label smoothing, drawn
per sample on the training device without reading a tensor back to the host."""

import math

import torch
from torch import Tensor

from vit_hf.data.augment import check_images
from vit_hf.data.random_draws import normal, sample_beta, uniform

# timm's RandomErasing tries this many boxes per sample before it gives up on one that does not fit.
ERASING_ATTEMPTS = 10


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
    check_images(images)
    if not 0 <= probability <= 1:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    n, _, height, width = images.shape
    device = images.device
    area = height * width * (scale[0] + (scale[1] - scale[0]) * uniform((n, ERASING_ATTEMPTS), generator, device))
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * uniform((n, ERASING_ATTEMPTS), generator, device))
    box_heights = (area * aspect).sqrt().round()
    box_widths = (area / aspect).sqrt().round()
    fits = (box_heights < height) & (box_widths < width)
    first_fit = fits.int().argmax(dim=1, keepdim=True)
    box_height = box_heights.gather(1, first_fit).squeeze(1)
    box_width = box_widths.gather(1, first_fit).squeeze(1)
    # Uniform integer offsets in [0, size - box]; the clamp guards against float32 rounding rand() * n up to n.
    top = torch.minimum((uniform((n,), generator, device) * (height - box_height + 1)).floor(), height - box_height)
    left = torch.minimum((uniform((n,), generator, device) * (width - box_width + 1)).floor(), width - box_width)
    erase = fits.any(dim=1) & (uniform((n,), generator, device) < probability)

    rows = torch.arange(height, device=device)
    columns = torch.arange(width, device=device)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_height)[:, None])
    in_columns = (columns >= left[:, None]) & (columns < (left + box_width)[:, None])
    inside = in_rows[:, None, :, None] & in_columns[:, None, None, :] & erase[:, None, None, None]
    return torch.where(inside, normal(images.shape, generator, device, images.dtype), images)


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot float32 rows with label smoothing (timm's convention): 1 - smoothing + smoothing / num_classes
    on the label, smoothing / num_classes elsewhere; each row sums to one."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    # A comparison, not F.one_hot: one_hot reads the labels' range back to the host to check it.
    one_hot = (labels[:, None] == torch.arange(num_classes, device=labels.device)).float()
    return one_hot * (1 - smoothing) + smoothing / num_classes


def _cut_span(lam: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
    """Which of `size` pixels (bool) one side of timm's rand_bbox covers: a cut of int(size * sqrt(1 - lam))
    pixels centred on a uniform pixel, clipped to the image."""
    half_cut = (size * (1 - lam).sqrt()).floor().div(2).floor()
    # The clamp guards against float32 rounding rand() * size up to size.
    centre = (uniform((), generator, lam.device) * size).floor().clamp(max=size - 1)
    positions = torch.arange(size, device=lam.device)
    return (positions >= centre - half_cut) & (positions < centre + half_cut)


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
    from label-smoothed one-hots, each row summing to one. Unmixed, a batch comes back with lam = 1.
    """
    _check_mix(images, mixup_alpha, cutmix_alpha, prob, switch_prob)
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    if (mixup_alpha == 0 and cutmix_alpha == 0) or prob == 0:
        return images, targets

    mix = uniform((), generator, images.device) < prob
    use_cutmix, lam = _draw_method(mixup_alpha, cutmix_alpha, switch_prob, generator, images.device)
    height, width = images.shape[-2:]
    cutting = mix & use_cutmix
    pasted = _cut_span(lam, height, generator)[:, None] & _cut_span(lam, width, generator) & cutting
    # The weight of each sample's own image: lam for Mixup, 1 (the image as it is) for CutMix or no mixing.
    own_weight = torch.where(mix & ~use_cutmix, lam, 1.0)
    partners = images.flip(0)
    mixed = torch.where(pasted, partners, own_weight * images + (1 - own_weight) * partners)
    # Like timm, CutMix's lam becomes the share of the image that the clipped box leaves.
    lam = torch.where(cutting, 1 - pasted.sum() / (height * width), own_weight)
    return mixed, lam * targets + (1 - lam) * targets.flip(0)


def _check_mix(images: Tensor, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float) -> None:
    """A ValueError for images or settings that `mixup_cutmix` cannot take."""
    check_images(images)
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
    for name, value in (("prob", prob), ("switch_prob", switch_prob)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def _draw_method(
    mixup_alpha: float, cutmix_alpha: float, switch_prob: float, generator: torch.Generator | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Whether the batch is cut (CutMix) rather than blended (Mixup), and its lam, as tensors on `device`."""
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = uniform((), generator, device) < switch_prob
        # Both lambdas are drawn and the chosen one kept: drawing only that one would read use_cutmix.
        lam = torch.where(
            use_cutmix,
            sample_beta(cutmix_alpha, (), generator, device),
            sample_beta(mixup_alpha, (), generator, device),
        )
    else:
        use_cutmix = torch.full((), cutmix_alpha > 0, device=device)
        lam = sample_beta(max(mixup_alpha, cutmix_alpha), (), generator, device)
    return use_cutmix, lam
