"""LoRA fine-tuning (`model.lora`): what trains, the merged export, resume, and bad sections."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from launch import offline_env, one_line_error
from peft import LoraConfig, get_peft_model
from PIL import Image
from runs import CIFAR10_CLASSES, finetune, losses, run_here, tiny_recipe, weights, write_recipe
from safetensors.torch import load_file
from transformers import AutoImageProcessor, ViTForImageClassification

from vit_hf.finetune import main as finetune_main
from vit_hf.models.conversion import load_npz
from vit_hf.publish.model_dir import save_model_dir
from vit_hf.recipe import load_recipe, resolve_recipe
from vit_hf.utils.errors import UserError

# Rank 4 with alpha 16: a scaling of 4, so a merge that forgets it cannot pass; fc1 is wider than the attention.
LORA = {"r": 4, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "fc1"]}


def lora_recipe(cifar10_dir, jax_reference_dir, out):
    """The tiny official-layout checkpoint with adapters; dropout and augmentation draw from every random stream."""
    model = {"pretrained": str(jax_reference_dir / "tiny_token.npz"), "image_size": 32, "config": {}, "lora": LORA}
    return tiny_recipe(
        cifar10_dir,
        out,
        model=model,
        data={"augment": {"crop_scale": [0.3, 1.0], "hflip": True}},
        train={"report_to": []},
    )


def pretrained(jax_reference_dir) -> ViTForImageClassification:
    """The model the run starts from: the converted checkpoint with a new CIFAR-10 head."""
    model, _ = load_npz(jax_reference_dir / "tiny_token.npz", image_size=32, labels=CIFAR10_CLASSES)
    return model


def adapted_model(jax_reference_dir, checkpoint) -> torch.nn.Module:
    """The adapted model of a checkpoint, built by peft itself (adapters unmerged), in eval mode."""
    config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"],
        modules_to_save=["classifier"],
    )
    model = get_peft_model(pretrained(jax_reference_dir), config)
    model.load_state_dict(weights(checkpoint))
    return model.eval()


def cifar_images(cifar10_dir, rows: int = 16) -> list[Image.Image]:
    table = pq.read_table(cifar10_dir / "test.parquet").slice(0, rows).to_pylist()
    return [Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB") for row in table]


@pytest.fixture(scope="module")
def lora_run(cifar10_dir, jax_reference_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    results = run_here(lora_recipe(cifar10_dir, jax_reference_dir, out))
    return out, results


@pytest.mark.slow
def test_only_the_adapters_and_the_head_change(lora_run, jax_reference_dir):
    out, _ = lora_run
    before = pretrained(jax_reference_dir).state_dict()
    middle, after = weights(out / "checkpoints" / "step_3"), weights(out / "checkpoints" / "step_6")
    trained = set()
    for name, tensor in after.items():
        # peft's names: the adapted model under base_model.model, an adapted layer's own weights under base_layer,
        # the head's original under original_module and its trained copy under modules_to_save.
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
        if plain in before:
            torch.testing.assert_close(tensor, before[plain], atol=0, rtol=0, msg=name)
        else:
            trained.add(name)
            assert not torch.equal(tensor, middle[name]), f"{name} did not change over updates 4 to 6"
    adapters = {
        f"base_model.model.vit.layers.{layer}.{module}.lora_{ab}.default.weight"
        for layer in range(2)
        for module in ("attention.q_proj", "attention.v_proj", "mlp.fc1")
        for ab in "AB"
    }
    head = {f"base_model.model.classifier.modules_to_save.default.{p}" for p in ("weight", "bias")}
    assert trained == adapters | head


@pytest.mark.slow
def test_the_export_is_merged_and_gives_the_adapted_models_logits(lora_run, cifar10_dir, jax_reference_dir):
    out, results = lora_run
    assert results["best_step"] in (3, 6)  # minival every 3 updates, a checkpoint at each
    reference = adapted_model(jax_reference_dir, out / "checkpoints" / f"step_{results['best_step']}")
    exported = ViTForImageClassification.from_pretrained(out).eval()
    pixels = AutoImageProcessor.from_pretrained(out)(cifar_images(cifar10_dir), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(
            exported(pixel_values=pixels).logits, reference(pixel_values=pixels).logits, atol=1e-5, rtol=0
        )


@pytest.mark.slow
def test_the_exported_folder_is_a_plain_vit_that_a_pipeline_loads_without_peft(
    lora_run, cifar10_dir, jax_reference_dir, tmp_path
):
    out, results = lora_run
    plain = save_model_dir(pretrained(jax_reference_dir), tmp_path / "plain")  # the same ViT exported without LoRA
    assert sorted(p.name for p in out.iterdir() if p.name.endswith((".json", ".safetensors"))) == sorted(
        ["config.json", "preprocessor_config.json", "model.safetensors", "recipe.json", "results.json"]
    )
    assert set(json.loads((out / "config.json").read_text())) == set(json.loads((plain / "config.json").read_text()))
    assert set(load_file(out / "model.safetensors")) == set(load_file(plain / "model.safetensors"))

    image = tmp_path / "image.png"
    cifar_images(cifar10_dir, rows=1)[0].save(image)
    # peft made unimportable: transformers then takes it as absent, as on a machine without it.
    code = (
        "import json, sys; sys.modules['peft'] = None; from transformers import pipeline; "
        "print(json.dumps(pipeline('image-classification', model=sys.argv[1])(sys.argv[2], top_k=10)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(out), str(image)], capture_output=True, text=True, env=offline_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(result.stdout.strip().splitlines()[-1])
    reference = adapted_model(jax_reference_dir, out / "checkpoints" / f"step_{results['best_step']}")
    pixels = AutoImageProcessor.from_pretrained(out)(Image.open(image), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = reference(pixel_values=pixels).logits.softmax(-1)[0]
    scores = {p["label"]: p["score"] for p in predictions}
    assert scores == pytest.approx({name: probabilities[i].item() for i, name in enumerate(CIFAR10_CLASSES)}, abs=1e-5)


@pytest.mark.slow
def test_results_and_card_count_the_trained_parameters(lora_run, jax_reference_dir):
    out, results = lora_run
    hidden, mlp, rank, layers = 64, 128, LORA["r"], 2  # the tiny checkpoint's sizes
    per_layer = 2 * (rank * hidden + hidden * rank) + (rank * hidden + mlp * rank)  # q_proj, v_proj; fc1
    head = hidden * 10 + 10
    plain = sum(p.numel() for p in pretrained(jax_reference_dir).parameters())
    assert results["trainable_parameters"] == layers * per_layer + head
    assert results["total_parameters"] == plain + layers * per_layer + head  # peft also keeps the original head
    assert json.loads((out / "results.json").read_text())["trainable_parameters"] == results["trainable_parameters"]
    share = results["trainable_parameters"] / results["total_parameters"]
    card = (out / "README.md").read_text()
    assert (
        f"{results['trainable_parameters']:,} of {results['total_parameters']:,} parameters trained ({share:.2%})"
        in card
    )
    assert "LoRA (r 4, alpha 16, on q_proj, v_proj, fc1)" in card


@pytest.mark.slow
def test_resuming_from_a_checkpoint_continues_exactly(lora_run, cifar10_dir, jax_reference_dir, tmp_path):
    unbroken, _ = lora_run
    resumed = tmp_path / "resumed"
    # A run stopped right after its checkpoint at step 3: that checkpoint is all it leaves to continue from.
    checkpoint = resumed / "checkpoints" / "step_3"
    shutil.copytree(unbroken / "checkpoints" / "step_3", checkpoint)
    recipe = write_recipe(tmp_path, lora_recipe(cifar10_dir, jax_reference_dir, resumed))
    result = finetune(recipe, "--resume", str(checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 3" in result.stdout + result.stderr
    assert losses(resumed) == pytest.approx(losses(unbroken)[3:], abs=1e-6)
    for name, tensor in weights(unbroken / "checkpoints" / "step_6").items():
        torch.testing.assert_close(weights(resumed / "checkpoints" / "step_6")[name], tensor, atol=1e-6, rtol=0)
    for name, tensor in load_file(unbroken / "model.safetensors").items():
        torch.testing.assert_close(load_file(resumed / "model.safetensors")[name], tensor, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_lora_dropout_draws_on_each_process_so_another_process_count_cannot_resume(
    lora_run, cifar10_dir, jax_reference_dir, tmp_path
):
    unbroken, _ = lora_run
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step_3"
    shutil.copytree(unbroken / "checkpoints" / "step_3", checkpoint)
    shutil.copy(checkpoint / "augment_rng_0.pt", checkpoint / "augment_rng_1.pt")  # as two processes write it
    recipe = lora_recipe(cifar10_dir, jax_reference_dir, tmp_path / "resumed")
    recipe["data"]["augment"] = None  # the adapters' dropout is the run's only per-process randomness
    with pytest.raises(UserError) as refused:
        run_here(recipe, resume="auto")
    assert str(refused.value) == (
        f"--resume {checkpoint}: written by 2 processes, resumed on 1 process: model.lora.dropout draws random "
        "numbers on each process: resume it on 2 processes"
    )


@pytest.mark.parametrize(
    "lora, message",
    [
        ({"r": 0}, "model.lora.r: must be positive, got 0"),
        ({"target_modules": ["query"]}, 'model.lora.target_modules: "query" is not a Linear layer'),
        ({"target_modules": []}, "model.lora.target_modules: name at least one of"),
        ({"rank": 8}, "model.lora.rank: unknown field (known: r, alpha, dropout, target_modules)"),
        ({"alpha": -1}, "model.lora.alpha: must be positive"),
        ({"dropout": 1.0}, "model.lora.dropout: must be in [0, 1)"),
        ("on", 'model.lora: expected an object or null, got "on"'),
    ],
)
def test_bad_lora_sections_are_refused_naming_the_field(lora, message):
    with pytest.raises(UserError) as error:
        resolve_recipe({"model": {"lora": lora}})
    assert message in str(error.value)


def test_lora_needs_a_pretrained_model_and_fills_its_defaults():
    with pytest.raises(UserError, match="model.lora: adapters fine-tune a pretrained model"):
        resolve_recipe({"model": {"pretrained": None, "lora": {}}})
    assert resolve_recipe({})["model"]["lora"] is None
    assert resolve_recipe({}, ["model.lora.r=16"])["model"]["lora"] == {
        "r": 16,
        "alpha": 16,
        "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
    }


@pytest.mark.slow  # a process of its own: seconds of imports
def test_a_bad_lora_section_is_one_line_exit_2(tmp_path, capsys):
    # In this process: test_finetune's bad-recipe test runs the command line in a process of its own.
    raw = {"model": {"lora": {"target_modules": ["q_proj", "qkv"]}}, "output": {"dir": str(tmp_path / "o")}}
    recipe = write_recipe(tmp_path, raw)
    assert one_line_error(finetune_main, [str(recipe)], capsys) == (
        f'error: {recipe}: model.lora.target_modules: "qkv" is not a Linear layer of transformers\' ViTLayer '
        "(q_proj, k_proj, v_proj, o_proj, fc1, fc2)\n"
    )
    assert not (tmp_path / "o").exists()


def test_the_cifar100_lora_recipe_is_the_official_one_with_adapters_and_a_higher_lr():
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    lora, full = load_recipe(recipes / "cifar100_lora.json"), load_recipe(recipes / "cifar100.json")
    assert lora["model"]["lora"] == {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    assert lora["optim"] == full["optim"] | {"lr": 0.1}
    assert lora["model"] | {"lora": None} == full["model"]
    for section in ("data", "schedule", "train", "hub"):
        assert lora[section] == full[section], section
    assert lora["output"]["dir"] != full["output"]["dir"]
    assert "TARGET" in lora["description"]
