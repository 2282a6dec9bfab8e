"""Attention rollout, checked by hand on the tiny official model, and the pictures made from it."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from transformers import AutoImageProcessor, ViTForImageClassification

from vit_hf.attention import main
from vit_hf.models.conversion import load_npz
from vit_hf.publish.attention_maps import (
    attention_rollout,
    pixels_to_images,
    prediction_grid,
    rollout,
    rollout_overlay,
)
from vit_hf.publish.model_dir import save_model_dir

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TOKENS = 1 + 8 * 8  # the tiny model: 32 px images, 4 px patches


@pytest.fixture(scope="module")
def model_dir(jax_reference_dir, tmp_path_factory):
    model, _ = load_npz(jax_reference_dir / "tiny_token.npz", labels=CIFAR10_CLASSES)
    return save_model_dir(model, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def model(model_dir):
    return ViTForImageClassification.from_pretrained(model_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def cifar_images(jax_reference_dir):
    """Eight real CIFAR-10 test images (uint8 NHWC) and the model inputs the project's preprocessing makes of them."""
    images = np.load(jax_reference_dir / "tiny_token.expected.npz")["pixels_uint8_nhwc"]
    return images, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _hand_rollout(attentions: list[np.ndarray]) -> np.ndarray:
    """Abnar and Zuidema's recipe, one image and one layer at a time, in float64."""
    batch, _, tokens, _ = attentions[0].shape
    maps = []
    for b in range(batch):
        joint = np.eye(tokens)
        for layer in attentions:
            a = layer[b].astype(np.float64).mean(axis=0) + np.eye(tokens)
            a = a / a.sum(axis=1, keepdims=True)
            joint = a @ joint
        grid = int(round((tokens - 1) ** 0.5))
        maps.append(joint[0, 1:].reshape(grid, grid))
    return np.stack(maps)


def test_rollout_matches_a_hand_computation_from_the_returned_attentions(model, cifar_images):
    _, pixels = cifar_images
    with torch.no_grad():
        attentions = [a.numpy() for a in model(pixels, output_attentions=True).attentions]

    maps = attention_rollout(model, pixels)

    assert maps.shape == (8, 8, 8)
    np.testing.assert_allclose(maps.numpy(), _hand_rollout(attentions), rtol=1e-5, atol=1e-7)


def test_rollout_rows_sum_to_one_over_all_tokens(model, cifar_images):
    with torch.no_grad():
        attentions = model(cifar_images[1], output_attentions=True).attentions

    torch.testing.assert_close(rollout(attentions).sum(dim=-1), torch.ones(8, TOKENS))


def test_one_layer_of_uniform_attention_rolls_out_to_a_uniform_map():
    uniform = torch.full((2, 4, TOKENS, TOKENS), 1 / TOKENS)

    class_row = rollout([uniform])[:, 0, 1:]

    # (U + I) / 2: every patch gets half of the uniform weight 1/T.
    torch.testing.assert_close(class_row, torch.full((2, TOKENS - 1), 0.5 / TOKENS))


def test_a_model_whose_queries_and_keys_are_zero_attends_to_all_patches_alike(model, cifar_images):
    with torch.no_grad():
        for layer in model.vit.layers:
            for projection in (layer.attention.q_proj, layer.attention.k_proj):
                projection.weight.zero_()
                projection.bias.zero_()

    maps = attention_rollout(model, cifar_images[1])

    # Two layers of (U + I) / 2 compose to (3U + I) / 4.
    torch.testing.assert_close(maps, torch.full((8, 8, 8), 0.75 / TOKENS))


def test_rollout_leaves_the_models_attention_kernel_and_training_mode_as_they_were(model_dir, cifar_images):
    model = ViTForImageClassification.from_pretrained(model_dir, attn_implementation="sdpa").train()

    attention_rollout(model, cifar_images[1][:2])

    assert model.config._attn_implementation == "sdpa" and model.training


def test_pixels_to_images_undoes_the_saved_preprocessing(model_dir, cifar_images):
    images, _ = cifar_images
    processor = AutoImageProcessor.from_pretrained(model_dir)

    pixel_values = processor(list(images), return_tensors="pt")["pixel_values"]

    np.testing.assert_array_equal(pixels_to_images(pixel_values), images)


def test_prediction_grid_is_an_hwc_uint8_picture_for_tensorboard(cifar_images):
    images, _ = cifar_images
    labels = [3, 8, 8, 0, 6, 6, 1, 6]
    predictions = [3, 8, 1, 0, 6, 5, 1, 6]

    grid = prediction_grid(images, labels, predictions, CIFAR10_CLASSES, columns=4)

    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    assert grid.shape[1] > grid.shape[0]  # 4 columns, 2 rows
    assert grid.min() < 50 and grid.max() == 255  # a picture on white, not a blank canvas


def test_cli_writes_a_side_by_side_png_per_real_cifar_jpeg(capsys, model_dir, cifar10_dir, tmp_path):
    rows = pq.read_table(cifar10_dir / "test.parquet").slice(0, 3).to_pylist()
    for i, row in enumerate(rows):
        (tmp_path / f"test_{i}.jpg").write_bytes(row["img"]["bytes"])

    main([str(model_dir), str(tmp_path), "--out", str(tmp_path / "maps"), "--batch-size", "2"])

    written = sorted(path.name for path in (tmp_path / "maps").iterdir())
    assert written == ["test_0_attention.png", "test_1_attention.png", "test_2_attention.png"]
    assert capsys.readouterr().out.count("wrote ") == 3
    with Image.open(tmp_path / "maps" / "test_0_attention.png") as picture:
        assert picture.width > 1.5 * picture.height  # image and overlay side by side


def test_cli_refuses_two_images_whose_maps_would_overwrite_each_other(capsys, model_dir, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / folder / "cat.png")

    with pytest.raises(SystemExit) as exit_:
        main([str(model_dir), str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "maps")])

    assert exit_.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "maps").exists()


def test_the_rollout_overlay_blends_the_image_half_and_half_with_matplotlibs_jet(cifar_images):
    images, _ = cifar_images
    heat = torch.tensor([[0.5, 1.0]])  # stretched over the width: 0.5 at the left edge, 1 at the right

    overlay = rollout_overlay(images[0], heat).astype(float)

    for column, value in ((32, 0.5), (63, 1.0)):
        expected = 0.5 * images[0][:, column - 32] + 0.5 * 255 * np.array(colormaps["jet"](value)[:3])
        np.testing.assert_allclose(overlay[:, column], expected, atol=1)


def test_the_rollout_overlay_shows_the_image_and_reddens_where_the_map_is_hot(cifar_images):
    images, _ = cifar_images
    heat = torch.zeros(4, 4)
    heat[0, 3] = 1.0  # the top right patch

    overlay = rollout_overlay(images[0], heat)

    assert overlay.dtype == np.uint8 and overlay.shape == (32, 64, 3)
    np.testing.assert_array_equal(overlay[:, :32], images[0])
    right = overlay[:, 32:].astype(int)
    hot, cold = right[:4, -4:], right[-4:, :4]
    assert (hot[..., 0] - hot[..., 2]).mean() > 60 and (cold[..., 2] - cold[..., 0]).mean() > 40  # red vs blue
