"""Batched augmentations: each op against Pillow or a hand-computed result, and the random policies'
contracts (shapes, ranges, per-sample choices, seeds, soft targets)."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from vit_hf.augment import (
    FILL,
    OP_NAMES,
    OPS,
    apply_ops,
    draw_ops,
    mixup_cutmix,
    rand_augment,
    random_erasing,
    save_preview_grid,
    smooth_one_hot,
    trivial_augment,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def cifar_pil(cifar10_dir) -> list[Image.Image]:
    """The first 8 test images of real CIFAR-10 (32x32 RGB)."""
    rows = pq.ParquetFile(cifar10_dir / "test.parquet").read_row_group(0).slice(0, 8).to_pylist()
    return [Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB") for row in rows]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images as a float batch (B, 3, H, W) in [0, 1]."""
    return torch.tensor(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def cifar(cifar_pil) -> torch.Tensor:
    return to_tensor(cifar_pil)


# ---------------------------------------------------------------------------------------------------------
# Single ops
# ---------------------------------------------------------------------------------------------------------

# Op name -> (a magnitude per sample, Pillow's version of the op at that magnitude, tolerance). The
# enhancement ops differ from Pillow by its 8-bit rounding of the blend and of the grey it blends with.
PILLOW_REFERENCES = {
    "Solarize": ([51 / 255, 128 / 255, 204 / 255, 1.0], lambda im, m: ImageOps.solarize(im, round(m * 255)), 1e-6),
    "Posterize": ([1, 3, 5, 8], lambda im, m: ImageOps.posterize(im, m), 1e-6),
    "Equalize": ([0] * 4, lambda im, m: ImageOps.equalize(im), 1e-6),
    "AutoContrast": ([0] * 4, lambda im, m: ImageOps.autocontrast(im), 1.01 / 255),
    "Brightness": ([0.9, -0.9, 0.3, -0.3], lambda im, m: ImageEnhance.Brightness(im).enhance(1 + m), 2 / 255),
    "Color": ([0.9, -0.9, 0.3, -0.3], lambda im, m: ImageEnhance.Color(im).enhance(1 + m), 2 / 255),
    "Contrast": ([0.9, -0.9, 0.3, -0.3], lambda im, m: ImageEnhance.Contrast(im).enhance(1 + m), 2 / 255),
    "Sharpness": ([0.9, -0.9, 0.3, -0.3], lambda im, m: ImageEnhance.Sharpness(im).enhance(1 + m), 2 / 255),
}


@pytest.mark.parametrize("name", PILLOW_REFERENCES)
def test_colour_op_matches_pillow_per_sample(name, cifar_pil):
    magnitudes, pillow_op, tolerance = PILLOW_REFERENCES[name]
    images = cifar_pil[:4]
    expected = to_tensor([pillow_op(image, m) for image, m in zip(images, magnitudes, strict=True)])
    out = OPS[name](to_tensor(images), torch.tensor(magnitudes, dtype=torch.float32))
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("name", ["Equalize", "AutoContrast"])
def test_histogram_op_leaves_a_flat_image_as_pillow_does(name):
    flat = Image.new("RGB", (8, 8), (77, 0, 255))
    expected = to_tensor([ImageOps.equalize(flat) if name == "Equalize" else ImageOps.autocontrast(flat)])
    torch.testing.assert_close(OPS[name](to_tensor([flat]), torch.zeros(1)), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "name, magnitude",
    [("Identity", 0.0), ("ShearX", 0.0), ("ShearY", 0.0), ("TranslateX", 0.0), ("TranslateY", 0.0)]
    + [("Rotate", 0.0), ("Brightness", 0.0), ("Color", 0.0), ("Contrast", 0.0), ("Sharpness", 0.0)]
    + [("Posterize", 8.0), ("Solarize", 1.01)],
)
def test_op_at_its_neutral_magnitude_is_identity(name, magnitude, cifar):
    out = OPS[name](cifar, torch.full((len(cifar),), magnitude))
    torch.testing.assert_close(out, cifar, atol=1e-5, rtol=0)


def assert_near(actual: torch.Tensor, expected: torch.Tensor | float) -> None:
    """Equal up to float rounding in the bilinear weights."""
    expected = torch.as_tensor(expected, dtype=actual.dtype).expand_as(actual)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_translate_shifts_by_whole_pixels_and_fills_grey():
    images = torch.rand(3, 3, 10, 12, generator=seeded(0))
    out_x = OPS["TranslateX"](images, torch.tensor([3.0, -2.0, 3.7]))
    assert_near(out_x[0, :, :, 3:], images[0, :, :, :-3])
    assert_near(out_x[0, :, :, :3], FILL)
    assert_near(out_x[1, :, :, :-2], images[1, :, :, 2:])
    assert_near(out_x[1, :, :, -2:], FILL)
    # Like torchvision's int(magnitude): 3.7 pixels shift by 3, without blur.
    assert_near(out_x[2, :, :, 3:], images[2, :, :, :-3])
    out_y = OPS["TranslateY"](images[:1], torch.tensor([4.0]))
    assert_near(out_y[0, :, 4:, :], images[0, :, :-4, :])
    assert_near(out_y[0, :, :4, :], FILL)


def shear_rows_by_hand(image: np.ndarray, factor: float) -> np.ndarray:
    """Pillow's AFFINE (1, factor, 0, 0, 1, 0) by hand: output row y, whose pixel centre lies y + 0.5 below the
    top edge, reads the input row at x + factor * (y + 0.5), linearly interpolated, FILL outside."""
    channels, height, width = image.shape
    out = np.empty_like(image)
    padded_positions = np.arange(-1, width + 1)
    for c in range(channels):
        for y in range(height):
            padded_row = np.concatenate([[FILL], image[c, y], [FILL]])
            positions = np.arange(width) + factor * (y + 0.5)
            out[c, y] = np.interp(positions, padded_positions, padded_row, left=FILL, right=FILL)
    return out


@pytest.mark.parametrize("factor", [0.3, -0.45])
def test_shear_x_matches_hand_computed_row_shifts(factor):
    image = torch.rand(3, 9, 11, generator=seeded(1))
    out = OPS["ShearX"](image[None], torch.tensor([factor]))[0]
    expected = shear_rows_by_hand(image.double().numpy(), factor)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("factor", [0.3, -0.45])
def test_shear_y_matches_hand_computed_column_shifts(factor):
    image = torch.rand(3, 11, 9, generator=seeded(2))
    out = OPS["ShearY"](image[None], torch.tensor([factor]))[0]
    expected = shear_rows_by_hand(image.transpose(1, 2).double().numpy(), factor).transpose(0, 2, 1)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_rotate_by_90_degrees_turns_counter_clockwise():
    images = torch.rand(2, 3, 8, 8, generator=seeded(3))
    out = OPS["Rotate"](images, torch.tensor([90.0, -90.0]))
    torch.testing.assert_close(out[0], torch.rot90(images[0], 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.rot90(images[1], -1, dims=(-2, -1)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# RandAugment and TrivialAugmentWide
# ---------------------------------------------------------------------------------------------------------


def torchvision_table(height: int, width: int, wide: bool) -> dict[str, tuple[torch.Tensor, bool]]:
    """torchvision's `_augmentation_space(31, (height, width))` of RandAugment, or of TrivialAugmentWide
    (wide), with Solarize's threshold on [0, 1]: each op's magnitude per bin, and whether it takes a sign."""
    bins = 31
    if wide:
        shear, enhance, shift_x, shift_y, degrees, posterize_steps = 0.99, 0.99, 32.0, 32.0, 135.0, 6
    else:
        shear, enhance, degrees, posterize_steps = 0.3, 0.9, 30.0, 4
        shift_x, shift_y = 150 / 331 * width, 150 / 331 * height
    zeros = torch.zeros(bins)
    return {
        "Identity": (zeros, False),
        "ShearX": (torch.linspace(0.0, shear, bins), True),
        "ShearY": (torch.linspace(0.0, shear, bins), True),
        "TranslateX": (torch.linspace(0.0, shift_x, bins), True),
        "TranslateY": (torch.linspace(0.0, shift_y, bins), True),
        "Rotate": (torch.linspace(0.0, degrees, bins), True),
        "Brightness": (torch.linspace(0.0, enhance, bins), True),
        "Color": (torch.linspace(0.0, enhance, bins), True),
        "Contrast": (torch.linspace(0.0, enhance, bins), True),
        "Sharpness": (torch.linspace(0.0, enhance, bins), True),
        "Posterize": (8 - (torch.arange(bins) / ((bins - 1) / posterize_steps)).round().int(), False),
        "Solarize": (torch.linspace(255.0, 0.0, bins) / 255, False),
        "AutoContrast": (zeros, False),
        "Equalize": (zeros, False),
    }


@pytest.mark.parametrize("wide", [False, True], ids=["rand_augment", "trivial_augment_wide"])
def test_draw_ops_follows_torchvision_magnitudes_and_signs(wide):
    height, width = 24, 40
    bins = torch.arange(31).repeat(200)
    ops, magnitudes = draw_ops(bins.float(), height, width, wide, generator=seeded(0))
    table = torchvision_table(height, width, wide)
    assert sorted(set(ops.tolist())) == list(range(len(OP_NAMES))), "every op drawn"
    for index, name in enumerate(OP_NAMES):
        picked = ops == index
        drawn = magnitudes[picked]
        # The posterize op rounds its magnitude to whole bits.
        size = drawn.abs().round() if name == "Posterize" else drawn.abs()
        values, signed = table[name]
        torch.testing.assert_close(size, values[bins[picked]].float(), atol=1e-5, rtol=0)
        negative_share = (drawn < 0).float().mean()
        assert 0.35 < negative_share < 0.65 if signed else negative_share == 0


def test_apply_ops_gives_each_sample_its_own_op(cifar):
    strengths = {"Solarize": 0.6, "Posterize": 3.0, "ShearX": -0.2, "TranslateX": 5.0, "TranslateY": -4.0}
    strengths |= {"Rotate": 40.0, "Brightness": -0.5, "Contrast": 0.7}
    magnitudes = torch.tensor([strengths.get(name, 0.4) for name in OP_NAMES])
    images = cifar[torch.arange(len(OP_NAMES)) % len(cifar)]
    expected = torch.cat([OPS[name](images[i : i + 1], magnitudes[i : i + 1]) for i, name in enumerate(OP_NAMES)])
    out = apply_ops(images, torch.arange(len(OP_NAMES)), magnitudes)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


POLICIES = {
    "rand_augment": lambda images, generator: rand_augment(images, generator=generator),
    "rand_augment_strongest": lambda images, generator: rand_augment(images, 3, 30, generator=generator),
    "trivial_augment": lambda images, generator: trivial_augment(images, generator=generator),
}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_keeps_shape_dtype_and_unit_range(policy, dtype, cifar):
    images = cifar.to(dtype).repeat(4, 1, 1, 1)
    out = POLICIES[policy](images, seeded(0))
    assert out.shape == images.shape
    assert out.dtype == dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images)


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_draws_ops_per_sample(policy, cifar):
    copies = cifar[:1].repeat(32, 1, 1, 1)
    out = POLICIES[policy](copies, seeded(0))
    assert len(torch.unique(out.flatten(1), dim=0)) >= 10


def test_rand_augment_with_no_ops_is_identity(cifar):
    assert torch.equal(rand_augment(cifar, num_ops=0, generator=seeded(0)), cifar)


# ---------------------------------------------------------------------------------------------------------
# Random erasing
# ---------------------------------------------------------------------------------------------------------


def test_random_erasing_with_probability_zero_is_identity(cifar):
    normalised = cifar * 2 - 1
    assert torch.equal(random_erasing(normalised, probability=0.0, generator=seeded(0)), normalised)


def test_random_erasing_fills_one_rectangle_per_sample_with_standard_normal_noise():
    images = torch.zeros(64, 3, 32, 32)
    out = random_erasing(images, probability=1.0, generator=seeded(0))
    erased = out != 0
    assert torch.equal(erased, erased[:, :1].expand_as(erased)), "the same box in every channel"
    boxes = erased[:, 0]
    assert boxes.any(dim=(1, 2)).float().mean() >= 0.9
    for box in boxes[boxes.any(dim=(1, 2))]:
        height, width = int(box.any(dim=1).sum()), int(box.any(dim=0).sum())
        assert int(box.sum()) == height * width, "a filled rectangle"
        assert 0.01 <= height * width / box.numel() <= 0.4
        assert 0.2 <= height / width <= 5
    noise = out[erased]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


def test_random_erasing_box_has_the_drawn_area_and_aspect_ratio():
    # Area fraction 1/8 of 32x32 and height / width 2 leave one box size: 16 rows by 8 columns.
    out = random_erasing(torch.zeros(8, 3, 32, 32), 1.0, seeded(0), scale=(0.125, 0.125), ratio=(2.0, 2.0))
    boxes = (out != 0)[:, 0]
    assert torch.all(boxes.any(dim=2).sum(dim=1) == 16)
    assert torch.all(boxes.any(dim=1).sum(dim=1) == 8)


def test_random_erasing_leaves_a_sample_whose_box_cannot_fit():
    # Like timm: a box as large as the image never fits, so after its attempts the sample stays as it is.
    images = torch.zeros(8, 3, 16, 16)
    assert torch.equal(random_erasing(images, 1.0, seeded(0), scale=(1.0, 1.0), ratio=(1.0, 1.0)), images)


def test_random_erasing_rate_matches_probability():
    out = random_erasing(torch.zeros(4000, 3, 16, 16), probability=0.25, generator=seeded(0))
    assert 0.22 <= (out != 0).any(dim=(1, 2, 3)).float().mean() <= 0.28


# ---------------------------------------------------------------------------------------------------------
# Mixup / CutMix and label smoothing
# ---------------------------------------------------------------------------------------------------------


def test_smooth_one_hot_puts_one_minus_smoothing_plus_share_on_the_label():
    targets = smooth_one_hot(torch.tensor([2, 0]), num_classes=4, smoothing=0.2)
    expected = torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]])
    torch.testing.assert_close(targets, expected)


def distinct_batch(size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that are each one constant value, and labels 0..size-1, to tell every sample apart."""
    images = torch.linspace(-1, 1, size).view(size, 1, 1, 1).expand(size, 3, 16, 16).clone()
    return images, torch.arange(size)


def test_mixup_blends_each_image_with_the_reversed_batch_by_lam():
    images, labels = distinct_batch()
    mixed, targets = mixup_cutmix(images, labels, num_classes=10, cutmix_alpha=0.0, generator=seeded(0))
    lam = targets[0, labels[0]].item()
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot.flip(0))


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_lam_equals_the_unpasted_area_fraction(seed):
    images, labels = distinct_batch()
    mixed, targets = mixup_cutmix(images, labels, num_classes=10, mixup_alpha=0.0, generator=seeded(seed))
    from_self = (mixed == images).all(dim=1)
    from_partner = (mixed == images.flip(0)).all(dim=1)
    assert torch.all(from_self ^ from_partner), "every pixel comes from exactly one of the pair"
    lam = targets[torch.arange(len(labels)), labels]
    torch.testing.assert_close(lam, from_self.float().mean(dim=(1, 2)))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(len(labels)))


def test_mixed_targets_are_the_blend_of_smoothed_one_hots():
    images, labels = distinct_batch()
    smoothing, classes = 0.1, 10
    _, targets = mixup_cutmix(images, labels, classes, label_smoothing=smoothing, generator=seeded(0))
    on, off = 1 - smoothing + smoothing / classes, smoothing / classes
    lam = (targets[0, labels[0]].item() - off) / (on - off)
    smoothed = torch.full((len(labels), classes), off)
    smoothed[torch.arange(len(labels)), labels] = on
    torch.testing.assert_close(targets, lam * smoothed + (1 - lam) * smoothed.flip(0))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(len(labels)))


@pytest.mark.parametrize("switch_prob, expect_cutmix", [(1.0, True), (0.0, False)])
def test_switch_prob_chooses_between_cutmix_and_mixup(switch_prob, expect_cutmix):
    images, labels = distinct_batch()
    mixed, _ = mixup_cutmix(images, labels, 10, switch_prob=switch_prob, generator=seeded(0))
    from_one_source = ((mixed == images) | (mixed == images.flip(0))).all()
    assert bool(from_one_source) == expect_cutmix


@pytest.mark.parametrize("kwargs", [{"prob": 0.0}, {"mixup_alpha": 0.0, "cutmix_alpha": 0.0}])
def test_no_mixing_returns_the_images_and_smoothed_one_hots(kwargs):
    images, labels = distinct_batch()
    mixed, targets = mixup_cutmix(images, labels, 10, label_smoothing=0.1, generator=seeded(0), **kwargs)
    assert torch.equal(mixed, images)
    torch.testing.assert_close(targets, smooth_one_hot(labels, 10, 0.1))


# ---------------------------------------------------------------------------------------------------------
# Seeds, devices, bad input, preview
# ---------------------------------------------------------------------------------------------------------

AUGMENTATIONS = POLICIES | {
    "random_erasing": lambda images, generator: random_erasing(images * 2 - 1, 0.5, generator=generator),
    "mixup_cutmix": lambda images, generator: mixup_cutmix(
        images, torch.arange(len(images), device=images.device), 10, generator=generator
    )[0],
}


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_same_seed_gives_same_output_and_another_seed_another(augmentation, cifar):
    augment = AUGMENTATIONS[augmentation]
    first = augment(cifar, seeded(0))
    assert torch.equal(first, augment(cifar, seeded(0)))
    assert not torch.equal(first, augment(cifar, seeded(1)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_runs_on_the_images_device_with_a_cpu_generator(augmentation, device, cifar):
    out = AUGMENTATIONS[augmentation](cifar.to(device), seeded(0))
    assert out.device.type == device


@pytest.mark.parametrize(
    "call",
    [
        lambda: rand_augment(torch.rand(2, 1, 8, 8)),
        lambda: rand_augment(torch.rand(2, 3, 8, 8), magnitude=31),
        lambda: trivial_augment(torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)),
        lambda: random_erasing(torch.rand(2, 3, 8, 8), probability=1.5),
        lambda: mixup_cutmix(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), 10, prob=-0.1),
        lambda: smooth_one_hot(torch.tensor([0, 1]), 10, smoothing=1.0),
    ],
    ids=["channels", "magnitude", "uint8", "probability", "prob", "smoothing"],
)
def test_bad_argument_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_preview_grid_lays_out_tiles_and_maps_minus_one_to_black(tmp_path):
    images = torch.full((10, 3, 8, 8), -1.0)
    path = tmp_path / "preview" / "grid.png"
    save_preview_grid(images, path, nrow=4)
    grid = np.asarray(Image.open(path))
    # 4 tiles a row, 3 rows, 8 pixels each with 2-pixel gutters.
    assert grid.shape == (3 * 10 + 2, 4 * 10 + 2, 3)
    assert np.all(grid[2:10, 2:10] == 0)
    assert np.all(grid[:2] == 255) and np.all(grid[-12:, -12:] == 255), "gutters and the empty last tiles"
