"""The converter: official `.npz` -> transformers and back, checked against the official Flax outputs."""

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.ndimage
import torch
from official_vit import forward, random_params, write_checkpoint
from PIL import Image
from transformers import AutoImageProcessor, ViTForImageClassification, pipeline

from vit_hf.convert import main
from vit_hf.models.conversion import load_npz, model_to_npz_params, resize_position_embeddings

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _pixels(uint8_nhwc: np.ndarray) -> torch.Tensor:
    """The official input scaling, x / 127.5 - 1, in NCHW."""
    return torch.from_numpy(uint8_nhwc).permute(0, 3, 1, 2).float() / 127.5 - 1


def _convert(*args: str) -> int:
    """Run the CLI in-process; its exit code (0 when it returns)."""
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return int(exit_.code)
    return 0


# --- numerics against the official implementation -----------------------------------------------------


def test_converted_folder_reproduces_official_logits_and_features(jax_reference_dir, tmp_path):
    expected = np.load(jax_reference_dir / "tiny_token.expected.npz")
    assert _convert(jax_reference_dir / "tiny_token.npz", tmp_path / "tiny", "--keep-head") == 0
    model = ViTForImageClassification.from_pretrained(tmp_path / "tiny").eval()
    with torch.no_grad():
        pixels = _pixels(expected["pixels_uint8_nhwc"])
        logits = model(pixels).logits.numpy()
        features = model.vit(pixels).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(features, expected["cls_features"], atol=1e-5, rtol=0)


def test_saved_config_carries_official_layer_norm_eps_and_tanh_gelu(jax_reference_dir, tmp_path):
    _convert(jax_reference_dir / "tiny_token.npz", tmp_path / "tiny", "--keep-head")
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6
    assert config["hidden_act"] == "gelu_pytorch_tanh"  # jax.nn.gelu defaults to the tanh approximation


def test_preprocessor_gives_the_official_minus_one_to_one_scaling(jax_reference_dir, tmp_path):
    _convert(jax_reference_dir / "tiny_token.npz", tmp_path / "tiny", "--keep-head")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "tiny")
    pixels = np.load(jax_reference_dir / "tiny_token.expected.npz")["pixels_uint8_nhwc"]
    processed = processor(list(pixels), return_tensors="pt")["pixel_values"]
    # Same size in and out: the bilinear resize is the identity, so this is exactly x / 127.5 - 1.
    torch.testing.assert_close(processed, _pixels(pixels), atol=1e-6, rtol=0)


@pytest.mark.parametrize("prefix", ["", "opt/target/", "params/"])
def test_random_vit_b16_checkpoint_matches_an_independent_numpy_forward(tmp_path, prefix):
    params = random_params(layers=2, representation=None, classes=1000, seed=1)
    path = write_checkpoint(tmp_path / "b16.npz", params, prefix=prefix)
    model, _ = load_npz(path, keep_head=True)
    images = np.random.default_rng(0).uniform(-1, 1, size=(2, 224, 224, 3))
    features, logits = forward(params, images)
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        ours = model(pixels, output_hidden_states=False).logits.double().numpy()
        ours_features = model.vit(pixels).last_hidden_state[:, 0].double().numpy()
    assert model.config.hidden_size == 768 and model.config.num_attention_heads == 12
    assert model.config.intermediate_size == 3072 and model.config.patch_size == 16
    assert model.config.image_size == 224 and model.config.num_hidden_layers == 2
    np.testing.assert_allclose(ours_features, features, atol=2e-4)
    np.testing.assert_allclose(ours, logits, atol=2e-4)


# --- every tensor accounted for ----------------------------------------------------------------------


def test_every_file_tensor_is_mapped_or_dropped_and_every_parameter_is_set(tmp_path):
    params = random_params(layers=1, representation=768, classes=21843)
    path = write_checkpoint(tmp_path / "in21k.npz", params)
    model, report = load_npz(path, num_labels=10)
    assert set(report.mapped) | set(report.dropped) == set(params)
    assert not set(report.mapped) & set(report.dropped)
    assert set(report.dropped) == {"pre_logits/kernel", "pre_logits/bias", "head/kernel", "head/bias"}
    assert set(report.mapped.values()) | set(report.initialised) == set(model.state_dict())
    assert not set(report.mapped.values()) & set(report.initialised)
    for file_key, model_key in report.mapped.items():
        assert model.state_dict()[model_key].numel() == params[file_key].size


def test_new_head_is_zero_initialised_with_the_given_label_names(tmp_path):
    path = write_checkpoint(tmp_path / "in21k.npz", random_params(layers=1, hidden=64, heads=4, mlp=128))
    model, report = load_npz(path, labels=CIFAR10_CLASSES)
    assert torch.count_nonzero(model.classifier.weight) == 0 and torch.count_nonzero(model.classifier.bias) == 0
    assert model.config.id2label == dict(enumerate(CIFAR10_CLASSES))
    assert model.config.label2id["truck"] == 9
    assert set(report.initialised) == {"classifier.weight", "classifier.bias"}


def test_keep_head_on_a_file_with_pre_logits_is_refused(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "in21k.npz", random_params(layers=1, hidden=64, heads=4, mlp=128))
    assert _convert(path, tmp_path / "out", "--keep-head") == 2
    assert "pre_logits" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- resolution change -------------------------------------------------------------------------------


def test_position_embedding_resize_equals_scipy_zoom_order_1():
    posemb = torch.randn(1, 1 + 14 * 14, 8, dtype=torch.float64)
    resized = resize_position_embeddings(posemb, 24)
    grid = posemb[0, 1:].numpy().reshape(14, 14, 8)
    reference = scipy.ndimage.zoom(grid, (24 / 14, 24 / 14, 1), order=1).reshape(1, 24 * 24, 8)
    np.testing.assert_allclose(resized[:, 1:].numpy(), reference, atol=1e-12)
    torch.testing.assert_close(resized[:, :1], posemb[:, :1])


def test_image_size_option_resizes_once_and_sets_config_and_processor(jax_reference_dir, tmp_path):
    assert _convert(jax_reference_dir / "tiny_token.npz", tmp_path / "big", "--image-size", 64, "--num-labels", 3) == 0
    model = ViTForImageClassification.from_pretrained(tmp_path / "big")
    original = np.load(jax_reference_dir / "tiny_token.npz")["Transformer/posembed_input/pos_embedding"]
    reference = scipy.ndimage.zoom(original[0, 1:].reshape(8, 8, 64), (2, 2, 1), order=1).reshape(1, 256, 64)
    posemb = model.vit.embeddings.position_embeddings.detach().numpy()
    np.testing.assert_allclose(posemb[:, 1:], reference, atol=1e-6)
    np.testing.assert_array_equal(posemb[:, :1], original[:, :1])
    assert model.config.image_size == 64
    processor = json.loads((tmp_path / "big" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 64, "width": 64} and processor["resample"] == 2
    assert processor["image_mean"] == [0.5] * 3 and processor["image_std"] == [0.5] * 3


# --- the way back ------------------------------------------------------------------------------------


def test_npz_to_hf_to_npz_is_lossless(jax_reference_dir, tmp_path):
    original = dict(np.load(jax_reference_dir / "tiny_token.npz"))
    assert _convert(jax_reference_dir / "tiny_token.npz", tmp_path / "hf", "--keep-head") == 0
    assert _convert(tmp_path / "hf", tmp_path / "back.npz", "--to-npz") == 0
    back = dict(np.load(tmp_path / "back.npz"))
    assert set(back) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_fine_tuned_model_exports_an_npz_the_official_forward_reads(tmp_path):
    path = write_checkpoint(tmp_path / "a.npz", random_params(layers=1, hidden=64, heads=4, mlp=128, patch=4, grid=8))
    model, _ = load_npz(path, num_labels=5)
    torch.nn.init.normal_(model.classifier.weight)  # stands in for fine-tuning
    exported = model_to_npz_params(model)
    images = np.random.default_rng(1).uniform(-1, 1, size=(3, 32, 32, 3))
    _, logits = forward(exported, images)
    with torch.no_grad():
        ours = model(torch.from_numpy(images).permute(0, 3, 1, 2).float()).logits.numpy()
    np.testing.assert_allclose(ours, logits, atol=1e-4)


# --- refused checkpoints and bad input ---------------------------------------------------------------


def _hybrid(tmp_path):
    params = random_params(layers=1, hidden=64, heads=4, mlp=128, patch=1, grid=8, representation=None, classes=10)
    params["conv_root/kernel"] = np.zeros((7, 7, 3, 64), np.float32)
    params["block1/unit1/conv1/kernel"] = np.zeros((1, 1, 64, 64), np.float32)
    return write_checkpoint(tmp_path / "R50+ViT-B_16.npz", params)


def _gap(tmp_path):
    params = random_params(layers=1, hidden=64, heads=4, mlp=128, representation=None, classes=10)
    del params["cls"]
    params["Transformer/posembed_input/pos_embedding"] = params["Transformer/posembed_input/pos_embedding"][:, 1:]
    return write_checkpoint(tmp_path / "gap.npz", params)


def _truncated(tmp_path):
    path = write_checkpoint(tmp_path / "full.npz", random_params(layers=1, hidden=64, heads=4, mlp=128))
    cut = tmp_path / "truncated.npz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cut


def _not_a_zip(tmp_path):
    path = tmp_path / "page.npz"
    path.write_text("<html>404 Not Found</html>")
    return path


def _something_else(tmp_path):
    path = tmp_path / "weights.npz"
    np.savez(path, w=np.zeros(3), b=np.ones(2))
    return path


def _missing_key(tmp_path):
    params = random_params(layers=2, hidden=64, heads=4, mlp=128, representation=None, classes=10)
    del params["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    return write_checkpoint(tmp_path / "missing.npz", params)


def _misshaped_key(tmp_path):
    params = random_params(layers=2, hidden=64, heads=4, mlp=128, representation=None, classes=10)
    params["Transformer/encoderblock_1/LayerNorm_2/scale"] = np.ones(65, np.float32)
    return write_checkpoint(tmp_path / "misshaped.npz", params)


def _object_array(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, w=np.array([{"code": "runs at load"}], dtype=object))
    return path


BAD_CHECKPOINTS = {
    "missing file": (lambda tmp_path: tmp_path / "nowhere.npz", "no such file"),
    "truncated download": (_truncated, "not a readable .npz"),
    "not a zip (a text file named .npz)": (_not_a_zip, "not a zip archive"),
    "pickled object array": (_object_array, "holds a pickled (object) array, which is never loaded"),
    "npz of something else": (_something_else, "not an official ViT checkpoint"),
    "missing key": (_missing_key, "missing tensor Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"),
    "misshaped key": (_misshaped_key, "LayerNorm_2/scale has shape (65,), expected (64,)"),
    "hybrid": (_hybrid, "hybrid R50+ViT"),
    "gap classifier": (_gap, "'gap'"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_gives_one_line_error_exit_2_and_no_output(case, tmp_path, capsys):
    make, words = BAD_CHECKPOINTS[case]
    source = make(tmp_path)
    assert _convert(source, tmp_path / "out", "--num-labels", 10) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(source) in err and words in err
    assert len(err.splitlines()) == 1 and "allow_pickle" not in err
    assert not (tmp_path / "out").exists()


def test_image_size_not_divisible_by_patch_is_refused(jax_reference_dir, tmp_path, capsys):
    assert _convert(jax_reference_dir / "tiny_token.npz", tmp_path / "out", "--image-size", 30, "--keep-head") == 2
    assert "not divisible by the patch size 4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_error_in_a_real_process_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vit_hf.convert", str(tmp_path / "nowhere.npz"), str(tmp_path / "out"), "--keep-head"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'nowhere.npz'}: no such file")


def test_a_failed_conversion_leaves_an_earlier_output_intact(jax_reference_dir, tmp_path):
    assert _convert(jax_reference_dir / "tiny_token.npz", tmp_path / "out", "--keep-head") == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert _convert(_truncated(tmp_path), tmp_path / "out", "--num-labels", 3) == 2
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


# --- serving ---------------------------------------------------------------------------------------


def test_pipeline_on_real_cifar_images_returns_the_given_label_names(jax_reference_dir, cifar10_dir, tmp_path):
    _convert(jax_reference_dir / "tiny_token.npz", tmp_path / "cifar", "--labels", ",".join(CIFAR10_CLASSES))
    rows = pq.read_table(cifar10_dir / "test.parquet").slice(0, 4).to_pylist()
    images = [Image.open(io.BytesIO(row["img"]["bytes"])) for row in rows]
    classifier = pipeline("image-classification", model=str(tmp_path / "cifar"))
    for predictions in classifier(images, top_k=10):
        assert sorted(p["label"] for p in predictions) == sorted(CIFAR10_CLASSES)
