"""The official ViT preprocessing as batched tensor ops on the training device: random resized crop, resize, flip
and the [-1, 1] scaling of uint8 batches (`DeviceTransform`), and the crop boxes the loader's workers share."""

import math
from collections.abc import Sequence

import torch


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] pixels to float32 [-1, 1], the input range of the original ViT checkpoints.

    Float pixels are rescaled in place: they are a transform's own full-size batch, and on a CPU a new tensor of that
    size costs more to allocate than the rescaling itself.
    """
    if pixels.dtype == torch.uint8:
        return pixels.float().div_(127.5).sub_(1)
    return pixels.mul_(2).sub_(1)


def random_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: Sequence[float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(batch, 4) Inception-style random crops (top, left, height, width) of a height x width image, in pixels.

    As tf's sample_distorted_bounding_box and torchvision's RandomResizedCrop: an area fraction uniform in `scale`
    and an aspect ratio log-uniform in [3/4, 4/3]; the first of 10 attempts that fits in the image, else a central
    crop of the largest box with an aspect ratio in that range.
    """
    attempts = torch.rand(batch, 10, 2, generator=generator, device=device)
    offsets = torch.rand(batch, 2, generator=generator, device=device)
    return crop_boxes(attempts, offsets, height, width, scale)


def crop_boxes(
    attempts: torch.Tensor,
    offsets: torch.Tensor,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    scale: Sequence[float],
) -> torch.Tensor:
    """The boxes of `random_crop_boxes` from its uniform draws, attempts (B, 10, 2) and offsets (B, 2), for images
    of one size (ints) or of one size each ((B,) tensors)."""
    batch, device = len(attempts), attempts.device
    height = torch.as_tensor(height, dtype=torch.float32, device=device).expand(batch)
    width = torch.as_tensor(width, dtype=torch.float32, device=device).expand(batch)
    area = (height * width)[:, None] * (scale[0] + (scale[1] - scale[0]) * attempts[..., 0])
    aspect = torch.exp(math.log(4 / 3) * (2 * attempts[..., 1] - 1))
    crop_width = torch.sqrt(area * aspect).round()
    crop_height = torch.sqrt(area / aspect).round()
    fits = (crop_width >= 1) & (crop_width <= width[:, None]) & (crop_height >= 1) & (crop_height <= height[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none does)
    found = fits.any(dim=1)
    crop_width = torch.where(found, crop_width.gather(1, first)[:, 0], torch.minimum(width, (height * 4 / 3).round()))
    crop_height = torch.where(found, crop_height.gather(1, first)[:, 0], torch.minimum(height, (width * 4 / 3).round()))
    # Uniform integer offsets in [0, size - crop]; the clamp guards against float32 rounding rand() * n up to n.
    top = torch.minimum((offsets[:, 0] * (height - crop_height + 1)).floor(), height - crop_height)
    left = torch.minimum((offsets[:, 1] * (width - crop_width + 1)).floor(), width - crop_width)
    top = torch.where(found, top, ((height - crop_height) / 2).floor())
    left = torch.where(found, left, ((width - crop_width) / 2).floor())
    return torch.stack([top, left, crop_height, crop_width], dim=1)


def _resize_weights(size: int, start: torch.Tensor, length: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, out_size, size) weights that resample [start, start + length) of an axis of `size` pixels to out_size.

    PIL's bilinear filter: a triangle one output pixel wide, widened to the scale when downsampling (antialias),
    centred on each output pixel. The box is cut out, then resized (as the official pipeline, torchvision and the
    workers' `vit_hf.data.photos.resize_box` do): taps outside it are dropped, and each row sums to one.
    """
    scale = (length / out_size)[:, None, None]
    radius = scale.clamp(min=1)
    start, end = start[:, None, None], (start + length)[:, None, None]
    centres = start + (torch.arange(out_size, device=start.device)[None, :, None] + 0.5) * scale
    taps = torch.arange(size, device=start.device) + 0.5
    # 1 - |distance| / radius, clamped at 0; in place, as each new (B, out_size, size) tensor costs page faults.
    weights = (taps - centres).div_(radius).abs_().neg_().add_(1).clamp_(min=0)
    weights.mul_((taps > start) & (taps < end))
    return weights.div_(weights.sum(dim=2, keepdim=True))


class DeviceTransform:
    """The original ViT preprocessing of uint8 (B, 3, H, W) batches, as batched tensor ops on any device.

    train: an Inception-style random resized crop (`random_crop_boxes`, area fraction in crop_scale) resized to
    image_size, then a random horizontal flip if hflip; crop_scale=None leaves out the crop (a plain resize).
    eval: resize the whole image to image_size. Both end in [-1, 1] (`to_model_range`).

    Crop, resize and flip are one resampling with PIL's bilinear filter (antialiased when downsampling), written as
    two matrix products per sample with weights made for its crop box; a flip reverses the column weights. Where
    TF32 matmuls are allowed (CUDA), results stay within a quarter of a uint8 level.

    A batch the loader's workers prepared (its "prepared" key: large or mixed-size images, already cropped, resized
    and flipped there from the originals, see `make_loader`) is only scaled: pass prepared=True. Without a crop or
    a flip, an image_size x image_size batch is already the result (the resize is the identity), so eval needs no
    flag.
    """

    def __init__(
        self,
        image_size: int,
        train: bool,
        crop_scale: tuple[float, float] | None = (0.05, 1.0),
        hflip: bool = True,
    ):
        self.image_size = image_size
        self.crop_scale = crop_scale if train else None
        self.hflip = hflip and train

    def __call__(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, prepared: bool = False
    ) -> torch.Tensor:
        """uint8 (B, 3, H, W) to float32 (B, 3, S, S) in [-1, 1]; random draws from `generator` (on pixels' device).

        The [-1, 1] scaling is applied to the small input: each output pixel is a weighted mean of input pixels
        (weights summing to one), so scaling commutes with the resampling and costs nothing at full size.
        """
        images = to_model_range(pixels)
        return images if prepared else self._resample(images, generator)

    def geometry(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, prepared: bool = False
    ) -> torch.Tensor:
        """Crop, resize and flip: uint8 (B, 3, H, W) to float32 (B, 3, S, S) in [0, 1], for augmentations of pixel
        values (RandAugment, TrivialAugment) that work on [0, 1] images before `to_model_range`."""
        images = pixels.float() / 255
        return images if prepared else self._resample(images, generator)

    def _resample(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        batch, channels, height, width = images.shape
        device = images.device
        if self.crop_scale is None and not self.hflip and height == width == self.image_size:
            return images
        if self.crop_scale is None:
            boxes = torch.tensor([[0, 0, height, width]], dtype=torch.float32, device=device).expand(batch, 4)
        else:
            boxes = random_crop_boxes(batch, height, width, self.crop_scale, generator, device)
        top, left, crop_height, crop_width = boxes.unbind(dim=1)
        rows = _resize_weights(height, top, crop_height, self.image_size)
        columns = _resize_weights(width, left, crop_width, self.image_size)
        if self.hflip:
            flip = torch.rand(batch, generator=generator, device=device) < 0.5
            columns = torch.where(flip[:, None, None], columns.flip(dims=[1]), columns)
        # The width of all channels at once, (C * H, W) @ (W, S), then the height of each, (S, H) @ (H, S).
        wide = images.flatten(1, 2) @ columns.transpose(1, 2)
        return rows.unsqueeze(1) @ wide.view(batch, channels, height, self.image_size)
