"""The model a recipe asks for: official checkpoints, transformers folders, Hub ids, or from scratch."""

import numpy as np
import pytest
import scipy.ndimage
import torch

from vit_hf.models.build import build_model
from vit_hf.models.conversion import load_npz
from vit_hf.publish.model_dir import save_model_dir
from vit_hf.utils.errors import UserError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _section(pretrained, image_size=32, **extra) -> dict:
    return {"pretrained": pretrained, "image_size": image_size, "dropout": 0.0, "config": {}} | extra


def test_from_scratch_uses_the_official_layer_norm_and_gelu_and_the_class_names():
    config = {
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "intermediate_size": 96,
        "patch_size": 4,
    }
    model = build_model(_section(None, config=config, dropout=0.1), CLASSES)
    assert model.config.layer_norm_eps == 1e-6 and model.config.hidden_act == "gelu_pytorch_tanh"
    assert model.config.hidden_dropout_prob == 0.1 and model.config.num_hidden_layers == 2
    assert model.config.id2label[9] == "truck" and model.classifier.out_features == 10
    assert model.vit.embeddings.position_embeddings.shape == (1, 65, 48)


def test_from_scratch_refuses_an_invalid_config():
    with pytest.raises(UserError, match="model.config"):
        build_model(_section(None, config={"hidden_size": 50, "num_attention_heads": 3, "patch_size": 4}), CLASSES)


def test_official_checkpoint_gets_a_zero_head_for_the_classes(jax_reference_dir):
    model = build_model(_section(str(jax_reference_dir / "tiny_token.npz")), CLASSES[:3])
    assert model.config.id2label == {0: "airplane", 1: "automobile", 2: "bird"}
    assert torch.count_nonzero(model.classifier.weight) == 0


def test_folder_with_the_same_classes_keeps_its_head_and_weights(jax_reference_dir, tmp_path):
    source, _ = load_npz(jax_reference_dir / "tiny_token.npz", labels=CLASSES)
    torch.nn.init.normal_(source.classifier.weight)
    save_model_dir(source, tmp_path / "folder")
    model = build_model(_section(str(tmp_path / "folder")), CLASSES)
    for (key, a), b in zip(model.state_dict().items(), source.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=key)


def test_folder_with_other_classes_and_size_gets_a_zero_head_and_resampled_grid(jax_reference_dir, tmp_path):
    source, _ = load_npz(jax_reference_dir / "tiny_token.npz", labels=CLASSES)
    save_model_dir(source, tmp_path / "folder")
    model = build_model(_section(str(tmp_path / "folder"), image_size=48, dropout=0.2), ["cat", "dog"])
    assert model.classifier.out_features == 2 and torch.count_nonzero(model.classifier.weight) == 0
    assert model.config.image_size == 48 and model.config.hidden_dropout_prob == 0.2
    grid = source.vit.embeddings.position_embeddings.detach()[0, 1:].numpy().reshape(8, 8, -1)
    reference = scipy.ndimage.zoom(grid, (12 / 8, 12 / 8, 1), order=1).reshape(144, -1)
    np.testing.assert_allclose(model.vit.embeddings.position_embeddings.detach()[0, 1:].numpy(), reference, atol=1e-5)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 48, 48)).logits.shape == (1, 2)


def test_an_unreachable_hub_id_says_how_to_point_at_local_files():
    with pytest.raises(UserError) as error:
        build_model(_section("someone/not-cached-vit"), CLASSES)
    message = str(error.value)
    assert "model.pretrained" in message and "someone/not-cached-vit" in message and "local" in message
    assert "\n" not in message


@pytest.mark.parametrize("from_folder", [False, True], ids=["npz", "folder"])
def test_model_config_sets_the_dropout_rates_of_a_pretrained_model(jax_reference_dir, tmp_path, from_folder):
    source = str(jax_reference_dir / "tiny_token.npz")
    if from_folder:
        model, _ = load_npz(source, num_labels=10)
        save_model_dir(model, tmp_path / "folder")
        source = str(tmp_path / "folder")
    config = {"attention_probs_dropout_prob": 0.3, "hidden_dropout_prob": 0.2}
    model = build_model(_section(source, config=config), CLASSES)
    attention = [m for m in model.modules() if type(m).__name__ == "ViTAttention"]
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(attention) == model.config.num_hidden_layers and dropouts
    assert {m.attention_dropout for m in attention} == {0.3} and {m.p for m in dropouts} == {0.2}
    assert (model.config.attention_probs_dropout_prob, model.config.hidden_dropout_prob) == (0.3, 0.2)
