"""vit_hf.stochastic_depth: branches dropped per sample at timm's linear rates, in training only, leaving no trace."""

import copy
import json

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from vit_hf.models.stochastic_depth import add_stochastic_depth
from vit_hf.recipe import resolve_recipe
from vit_hf.utils.errors import UserError

LAYERS = 3


def _tiny_model(seed: int = 0) -> ViTForImageClassification:
    """A seeded random ViT of LAYERS blocks on 16 px images, without dropout (so only stochastic depth is random)."""
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return ViTForImageClassification(config)


def _images(count: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_rate_zero_is_the_plain_model_in_training_mode():
    plain = _tiny_model().train()
    model = copy.deepcopy(plain)
    add_stochastic_depth(model, 0.0)
    images = _images(8)
    torch.manual_seed(3)
    expected = plain(pixel_values=images).logits
    torch.manual_seed(3)
    assert torch.equal(model(pixel_values=images).logits, expected)


def _record_branches(model: ViTForImageClassification, layer: int, records: dict, stage: str) -> None:
    """Hooks appending one layer's two branch outputs to RECORDS under "attention STAGE" and "mlp STAGE". Registered
    before stochastic depth is added they see the branch as computed ("raw"), after it as passed on ("kept")."""
    block = model.vit.layers[layer]
    for name, module in (("attention", block.attention.o_proj), ("mlp", block.mlp.fc2)):
        key = f"{name} {stage}"
        records[key] = []
        module.register_forward_hook(lambda m, i, output, key=key: records[key].append(output.detach()))


@pytest.mark.parametrize("layer", [1, 2])
def test_each_branch_is_dropped_per_sample_at_the_linear_rate_and_kept_ones_rescaled(layer):
    rate, samples = 0.6, 3000
    probability = rate * layer / (LAYERS - 1)  # timm: torch.linspace(0, rate, depth)[layer]
    model = _tiny_model().train()
    records = {}
    _record_branches(model, layer, records, "raw")
    add_stochastic_depth(model, rate)
    _record_branches(model, layer, records, "kept")
    block_io = []
    model.vit.layers[layer].register_forward_hook(lambda m, inputs, output: block_io.append((inputs[0], output)))
    torch.manual_seed(4)
    with torch.no_grad():
        model(pixel_values=_images(samples))
    masks = {}
    for branch in ("attention", "mlp"):
        raw, kept = records[f"{branch} raw"][0], records[f"{branch} kept"][0]
        dropped = (kept == 0).flatten(1).all(dim=1)
        assert not (raw == 0).flatten(1).all(dim=1).any()  # so a zero output means a dropped branch
        # Whole samples only: the others are the raw branch scaled by 1 / (1 - p).
        torch.testing.assert_close(kept[~dropped], raw[~dropped] / (1 - probability), rtol=1e-6, atol=0)
        frequency = dropped.float().mean().item()
        sigma = (probability * (1 - probability) / samples) ** 0.5
        assert abs(frequency - probability) < 4 * sigma, (branch, frequency, probability)
        masks[branch] = dropped
    assert not torch.equal(masks["attention"], masks["mlp"])  # each branch draws its own mask
    # The residual stream goes on: a sample that skips both branches leaves the block unchanged.
    both = masks["attention"] & masks["mlp"]
    block_input, block_output = block_io[0]
    assert both.sum() > 50 and torch.equal(block_output[both], block_input[both])
    assert not (block_output[~both] == block_input[~both]).flatten(1).all(dim=1).any()


def test_the_first_layer_is_never_dropped():
    model = _tiny_model().train()
    records = {}
    _record_branches(model, 0, records, "raw")
    add_stochastic_depth(model, 0.9)
    _record_branches(model, 0, records, "kept")
    with torch.no_grad():
        model(pixel_values=_images(200))
    assert torch.equal(records["attention raw"][0], records["attention kept"][0])
    assert torch.equal(records["mlp raw"][0], records["mlp kept"][0])


def test_eval_mode_is_deterministic_and_the_plain_model():
    plain = _tiny_model().eval()
    model = copy.deepcopy(plain)
    add_stochastic_depth(model, 0.5)
    model.eval()
    images = _images(16)
    with torch.no_grad():
        expected = plain(pixel_values=images).logits
        assert torch.equal(model(pixel_values=images).logits, expected)
        assert torch.equal(model(pixel_values=images).logits, expected)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(pixel_values=images).logits, expected)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_same_masks(use_reentrant):
    # The recomputation draws the masks again: they match only because checkpointing restores the RNG state
    # (with preserve_rng_state=False the gradients differ).
    reference, checkpointed = _tiny_model().train(), _tiny_model().train()
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    images = _images(32)
    gradients = []
    for model in (reference, checkpointed):
        add_stochastic_depth(model, 0.5)
        torch.manual_seed(5)
        model(pixel_values=images).logits.square().sum().backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_the_mask_is_drawn_without_a_host_synchronisation():
    model = _tiny_model().train()
    add_stochastic_depth(model, 0.5)
    fc2 = model.vit.layers[2].mlp.fc2  # the hooked module alone: the rest of the forward is transformers' business
    hidden = torch.randn(8, 5, 64)
    # `.item()`, `bool(tensor)` and `.tolist()` all run aten::_local_scalar_dense, on any device.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fc2(hidden)
    names = [event.name for event in profile.events()]
    assert "aten::bernoulli_" in names  # the hook ran
    assert "aten::_local_scalar_dense" not in names


def test_the_saved_model_is_a_plain_vit(tmp_path):
    plain = _tiny_model()
    model = copy.deepcopy(plain)
    add_stochastic_depth(model, 0.5)
    model.train()
    model.save_pretrained(tmp_path / "with")
    plain.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "with" / "config.json").read_text())
    assert config == json.loads((tmp_path / "plain" / "config.json").read_text())
    loaded = ViTForImageClassification.from_pretrained(tmp_path / "with").eval()
    assert not any(module._forward_hooks for module in loaded.modules())
    images = _images(8)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=images).logits, plain.eval()(pixel_values=images).logits)


def test_a_second_call_and_bad_rates_are_refused():
    model = _tiny_model()
    add_stochastic_depth(model, 0.1)
    with pytest.raises(RuntimeError, match="already"):
        add_stochastic_depth(model, 0.1)
    for rate in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            add_stochastic_depth(_tiny_model(), rate)


def test_recipe_field_defaults_to_zero_and_bad_values_name_it():
    assert resolve_recipe({})["model"]["drop_path"] == 0.0
    assert resolve_recipe({"model": {"drop_path": 0.1}})["model"]["drop_path"] == 0.1
    for value in (1, 1.5, -0.1, "0.1", True):
        with pytest.raises(UserError) as error:
            resolve_recipe({"model": {"drop_path": value}})
        message = str(error.value)
        assert message.startswith("model.drop_path: ") and "\n" not in message, message
