"""Batched augmentations: each op against Pillow or a hand-computed result, the random policies'
contracts (shapes, ranges, per-sample choices, seeds, soft targets), their statistics against scipy and
timm's formulas, and that none of them reads a tensor back to the host."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from scipy import stats
from torch.profiler import ProfilerActivity, profile

from vit_hf.data.augment import (
    FILL,
    OP_NAMES,
    OPS,
    apply_ops,
    draw_ops,
    rand_augment,
    save_preview_grid,
    trivial_augment,
)
from vit_hf.data.mixing import mixup_cutmix, random_erasing, smooth_one_hot
from vit_hf.data.random_draws import sample_beta

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


@pytest.mark.parametrize("wide", [False, True], ids=["rand_augment", "trivial_augment_wide"])
def test_draw_ops_picks_ops_uniformly_and_signs_evenly(wide):
    ops, magnitudes = draw_ops(torch.full((7000,), 12.0), 32, 32, wide, generator=seeded(5))
    counts = torch.bincount(ops, minlength=len(OP_NAMES)).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    signed = [OP_NAMES.index(name) for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")]
    signed_magnitudes = magnitudes[torch.isin(ops, torch.tensor(signed))]
    negatives = int((signed_magnitudes < 0).sum())
    assert stats.binomtest(negatives, len(signed_magnitudes), 0.5).pvalue > 1e-3


def candidate_outputs(
    image: torch.Tensor, bins: list[int], wide: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every output a one-op policy can give for `image` (1, 3, H, W): each op at each of `bins`, with both
    signs where torchvision's table gives it one. Returns the outputs (K, 3 * H * W), their probabilities
    (op uniform, bin uniform over `bins`, fair sign) and their op indices (K,). Magnitudes are
    first + (last - first) * bin / 30 in float64, the line torchvision's linspace draws."""
    table = torchvision_table(*image.shape[-2:], wide)
    outputs, priors, op_indices = [], [], []
    for index, name in enumerate(OP_NAMES):
        values, signed = table[name]
        first, last = values[0].item(), values[-1].item()
        sizes = torch.tensor([first + (last - first) * b / 30 for b in bins], dtype=torch.float64)
        magnitudes = torch.cat([sizes, -sizes]) if signed else sizes
        outputs.append(OPS[name](image.expand(len(magnitudes), -1, -1, -1), magnitudes.float()).flatten(1))
        priors.append(torch.full((len(magnitudes),), 1 / (len(OP_NAMES) * len(magnitudes)), dtype=torch.float64))
        op_indices.append(torch.full((len(magnitudes),), index))
    return torch.cat(outputs), torch.cat(priors), torch.cat(op_indices)


def op_sets(outputs: torch.Tensor, candidates: torch.Tensor, op_indices: torch.Tensor) -> torch.Tensor:
    """For each output (N, D), the set of ops, as a bit mask, whose candidate outputs it equals (up to float
    rounding): a single op where the output tells which op it was, several where ops coincide (e.g. at bin 0)."""
    matches = torch.cdist(outputs.double(), candidates.double()) < 1e-3
    is_op = op_indices[:, None] == torch.arange(len(OP_NAMES))
    matched_ops = (matches.double() @ is_op.double()) > 0
    return (matched_ops.long() * 2 ** torch.arange(len(OP_NAMES))).sum(dim=1)


POLICY_BINS = {
    "rand_augment": (lambda images, generator: rand_augment(images, 1, 9, generator=generator), [9], False),
    "trivial_augment": (trivial_augment, list(range(31)), True),
}


@pytest.mark.parametrize("policy", POLICY_BINS)
def test_policy_applies_one_op_per_sample_with_uniform_frequencies(policy):
    # A noise image that every op changes in its own way; values inside (0, 1) so that AutoContrast acts.
    image = 0.1 + 0.8 * torch.rand(1, 3, 16, 16, generator=seeded(7))
    augment, bins, wide = POLICY_BINS[policy]
    candidates, priors, op_indices = candidate_outputs(image, bins, wide)
    outputs = augment(image.expand(2000, -1, -1, -1), generator=seeded(8)).flatten(1)
    observed = op_sets(outputs, candidates, op_indices)
    assert torch.all(observed > 0), "every output is one of the ops at one of the bins"
    # The chance of each set of ops: the summed probability of the candidates that give such an output.
    expected_sets, expected_index = op_sets(candidates, candidates, op_indices).unique(return_inverse=True)
    expected = torch.zeros(len(expected_sets), dtype=torch.float64).index_add_(0, expected_index, priors)
    assert set(observed.tolist()) <= set(expected_sets.tolist())
    counts = (observed[:, None] == expected_sets).sum(dim=0)
    assert stats.chisquare(counts.numpy(), expected.numpy() * len(outputs)).pvalue > 1e-3


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


@pytest.mark.parametrize("probability", [0.25, 0.7])
def test_random_erasing_rate_matches_probability(probability):
    # On 16x16 images one of the 10 boxes fits all but always, so the rate is the probability asked for.
    out = random_erasing(torch.zeros(3000, 3, 16, 16), probability=probability, generator=seeded(0))
    erased = int((out != 0).any(dim=(1, 2, 3)).sum())
    assert stats.binomtest(erased, len(out), probability).pvalue > 1e-3


def test_random_erasing_box_area_and_aspect_are_in_timms_ranges():
    # timm rounds sqrt(area * aspect) and sqrt(area / aspect) to a box of h x w pixels: the area and aspect that
    # round to it lie in [(h - 1/2)(w - 1/2), (h + 1/2)(w + 1/2)] and [(h - 1/2)/(w + 1/2), (h + 1/2)/(w - 1/2)],
    # which must meet the ranges drawn from: area fraction in [0.02, 1/3], aspect (height / width) in [0.3, 3.3].
    size = 32
    boxes = (random_erasing(torch.zeros(500, 3, size, size), 1.0, seeded(3)) != 0)[:, 0]
    assert bool(boxes.any(dim=(1, 2)).all())
    heights = boxes.any(dim=2).sum(dim=1).double()
    widths = boxes.any(dim=1).sum(dim=1).double()
    assert torch.equal(boxes.sum(dim=(1, 2)).double(), heights * widths), "one filled rectangle each"
    assert torch.all((heights + 0.5) * (widths + 0.5) / size**2 >= 0.02)
    assert torch.all((heights - 0.5) * (widths - 0.5) / size**2 <= 1 / 3)
    assert torch.all((heights + 0.5) / (widths - 0.5) >= 0.3)
    assert torch.all((heights - 0.5) / (widths + 0.5) <= 3.3)
    # The areas spread over the range rather than sitting at one size.
    fractions = heights * widths / size**2
    assert fractions.min() < 0.05 and fractions.max() > 0.28


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
    pasted = from_partner[0]
    rows, columns = pasted.any(dim=1), pasted.any(dim=0)
    assert torch.equal(pasted, rows[:, None] & columns), "the pasted region is one box, the same in every image"
    assert torch.equal(from_partner, pasted.expand_as(from_partner))
    lam = targets[torch.arange(len(labels)), labels]
    torch.testing.assert_close(lam, 1 - rows.sum() * columns.sum() / pasted.numel() * torch.ones(len(labels)))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(len(labels)))


def timm_cutmix_lams(lams: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """timm's rand_bbox and lam correction, written out: a box of int(side * sqrt(1 - lam)) pixels a side
    centred on a uniform pixel, clipped to the image; lam becomes the share of the image outside it."""
    cut_heights = (height * np.sqrt(1 - lams)).astype(int)
    cut_widths = (width * np.sqrt(1 - lams)).astype(int)
    centres_y, centres_x = rng.integers(height, size=len(lams)), rng.integers(width, size=len(lams))
    tops, bottoms = (np.clip(centres_y + sign * (cut_heights // 2), 0, height) for sign in (-1, 1))
    lefts, rights = (np.clip(centres_x + sign * (cut_widths // 2), 0, width) for sign in (-1, 1))
    return 1 - (bottoms - tops) * (rights - lefts) / (height * width)


def first_lam(targets: torch.Tensor, labels: torch.Tensor) -> float:
    """lam from soft targets made without label smoothing: the weight on the first sample's own label."""
    return targets[0, labels[0]].item()


def test_mixup_lam_follows_beta_alpha_alpha():
    images, labels = distinct_batch(2)
    generator = seeded(11)
    lams = [
        first_lam(mixup_cutmix(images, labels, 4, mixup_alpha=0.4, cutmix_alpha=0.0, generator=generator)[1], labels)
        for _ in range(600)
    ]
    assert stats.kstest(lams, stats.beta(0.4, 0.4).cdf).pvalue > 1e-3


def test_cutmix_lam_follows_timms_clipped_box_area():
    images, labels = distinct_batch(2)
    generator = seeded(12)
    lams = [
        first_lam(mixup_cutmix(images, labels, 4, mixup_alpha=0.0, cutmix_alpha=1.0, generator=generator)[1], labels)
        for _ in range(600)
    ]
    rng = np.random.default_rng(0)
    reference = timm_cutmix_lams(rng.beta(1.0, 1.0, size=20000), 16, 16, rng)
    assert stats.ks_2samp(lams, reference).pvalue > 1e-3


def test_prob_and_switch_prob_set_how_often_each_method_runs():
    # 64x64 images: a CutMix box of no pixels (lam above 1 - (2 / 64)^2) is too rare to pass for no mixing.
    images = torch.linspace(-1, 1, 2).view(2, 1, 1, 1).expand(2, 3, 64, 64).clone()
    labels = torch.arange(2)
    generator = seeded(13)
    mixed_calls = cutmix_calls = 0
    for _ in range(600):
        mixed, targets = mixup_cutmix(images, labels, 4, prob=0.6, switch_prob=0.3, generator=generator)
        if first_lam(targets, labels) < 1:
            mixed_calls += 1
            cutmix_calls += bool(((mixed == images) | (mixed == images.flip(0))).all())
    assert stats.binomtest(mixed_calls, 600, 0.6).pvalue > 1e-3
    assert stats.binomtest(cutmix_calls, mixed_calls, 0.3).pvalue > 1e-3


@pytest.mark.parametrize("seed", range(6))
def test_mixed_targets_sum_to_one(seed):
    images, labels = distinct_batch()
    _, targets = mixup_cutmix(images, labels, 10, label_smoothing=0.1, generator=seeded(seed))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(len(labels)))
    assert bool((targets > 0).all())


@pytest.mark.parametrize("alpha", [0.4, 0.8, 1.0, 2.5])
def test_sample_beta_matches_scipy_beta(alpha):
    samples = sample_beta(alpha, (20000,), generator=seeded(int(alpha * 10)))
    assert samples.dtype == torch.float32 and samples.shape == (20000,)
    assert bool(((samples >= 0) & (samples <= 1)).all())
    assert stats.kstest(samples.double().numpy(), stats.beta(alpha, alpha).cdf).pvalue > 1e-3


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_sample_beta_with_small_alpha_matches_scipy_beta_on_each_half(alpha):
    # For small alpha much of the mass lies within a float32 step (6e-8) of 1 (9% for alpha 0.1) and rounds to
    # 1.0, which a KS test over [0, 1] would measure. Beta(alpha, alpha) is symmetric and float32 is fine-grained
    # near 0: the lower half must follow scipy's Beta conditioned on it, and each half hold half the samples.
    samples = sample_beta(alpha, (20000,), generator=seeded(int(alpha * 100))).double().numpy()
    assert np.all((samples >= 0) & (samples <= 1))
    lower = samples[samples < 0.5]
    assert stats.binomtest(len(lower), len(samples), 0.5).pvalue > 1e-3
    assert stats.kstest(lower, lambda x: 2 * stats.beta(alpha, alpha).cdf(x)).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Host syncs, seeds, devices, bad input, preview
# ---------------------------------------------------------------------------------------------------------

# Mixup/CutMix with its defaults: both methods on, so that every draw runs.
AUGMENTATIONS = POLICIES | {
    "random_erasing": lambda images, generator: random_erasing(images * 2 - 1, 0.5, generator=generator),
    "mixup_cutmix": lambda images, generator: mixup_cutmix(
        images, torch.arange(len(images), device=images.device), 10, generator=generator
    )[0],
}


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_augmentation_reads_no_tensor_back_to_the_host(augmentation, cifar):
    # `.item()`, `bool(tensor)` and `.tolist()` all run aten::_local_scalar_dense; on a GPU each drains the queue.
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        AUGMENTATIONS[augmentation](cifar, seeded(0))
    assert [event.name for event in profiler.events() if event.name == "aten::_local_scalar_dense"] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_augmentation_never_synchronises_the_gpu(augmentation, cifar):
    # CUDA's sync debug mode also catches what the CPU profiler cannot: host-to-device copies of new tensors.
    images = cifar.cuda()
    generator = torch.Generator("cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        AUGMENTATIONS[augmentation](images, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_augmentation_draws_only_from_its_generator(augmentation, cifar):
    # The loop checkpoints the generator: no draw may come from torch's or NumPy's global generator.
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    AUGMENTATIONS[augmentation](cifar, seeded(0))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


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
