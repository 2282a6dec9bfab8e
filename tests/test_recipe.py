"""Recipes: every shipped one is valid, and bad ones are refused naming the field."""

import json
import re
from pathlib import Path

import pytest

from vit_hf.recipe import accumulation_steps, load_recipe, resolve_recipe
from vit_hf.utils.errors import UserError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.json"))
CIFAR10 = next(path for path in RECIPES if path.name == "cifar10.json")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid_and_says_what_it_reaches(path):
    recipe = load_recipe(path)
    assert recipe["description"] and "accuracy" in recipe["description"]
    assert "vit_hf.finetune" in recipe["description"]  # the launch command


def test_shipped_recipes_cover_the_issue():
    names = {p.stem for p in RECIPES}
    assert {
        "cifar10",
        "cifar100",
        "cifar10_384",
        "cifar100_384",
        "cifar10_short",
        "cifar10_cpu",
        "cifar10_scratch",
    } <= names


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_recipes_have_the_settings_of_the_original_experiment(name):
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.json")
    assert recipe["model"]["pretrained"] == "ViT-B_16" and recipe["model"]["image_size"] == 224
    assert recipe["optim"] == {
        "name": "sgd",
        "lr": 0.03,
        "momentum": 0.9,
        "nesterov": False,
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "momentum_dtype": "bfloat16",  # vit_jax's config.optim_dtype
        "layer_decay": None,
    }
    assert recipe["schedule"] == {"name": "cosine", "warmup_steps": 500, "total_steps": 10000, "linear_end": 1e-5}
    assert recipe["train"]["global_batch_size"] == 512 and recipe["train"]["eval_every"] == 100
    assert recipe["train"]["seed"] == 42
    assert recipe["data"]["train_split"] == "train[:98%]" and recipe["data"]["eval_split"] == "train[98%:]"


@pytest.mark.parametrize("path", [path for path in RECIPES if path.name.startswith("cifar")], ids=lambda p: p.name)
def test_cifar_recipes_keep_the_stored_minival_as_tfds(path):
    # vit_jax's minival is tfds' train[98%:], the last 1,000 stored rows: these recipes name that order.
    assert json.loads(path.read_text())["data"]["split_order"] == "stored"


def test_splits_are_drawn_shuffled_with_seed_0_by_default():
    data = resolve_recipe({})["data"]
    assert (data["split_order"], data["split_seed"]) == ("shuffled", 0)
    data = resolve_recipe({}, ["data.split_order=stored", "data.split_seed=7"])["data"]
    assert (data["split_order"], data["split_seed"]) == ("stored", 7)


def test_scratch_recipe_trains_a_12_layer_patch_4_vit_with_adamw():
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "cifar10_scratch.json")
    assert recipe["model"]["pretrained"] is None
    assert recipe["model"]["config"]["num_hidden_layers"] == 12 and recipe["model"]["config"]["patch_size"] == 4
    assert recipe["optim"]["name"] == "adamw" and recipe["train"]["label_smoothing"] > 0
    augment = recipe["data"]["augment"]
    assert augment["rand_augment"] and augment["random_erasing"] and augment["mixup_alpha"] and augment["cutmix_alpha"]


def test_defaults_fill_every_field():
    recipe = resolve_recipe({})
    assert recipe["data"]["augment"] == {
        "crop_scale": [0.05, 1.0],
        "hflip": True,
        "rand_augment": None,
        "trivial_augment": False,
        "random_erasing": 0.0,
        "mixup_alpha": 0.0,
        "cutmix_alpha": 0.0,
        "mix_prob": 1.0,
        "switch_prob": 0.5,
    }
    assert recipe["train"]["micro_batch_size"] == 64


def test_overrides_parse_json_values_and_fall_back_to_strings():
    recipe = resolve_recipe(
        {},
        [
            "train.micro_batch_size=32",
            "model.pretrained=null",
            "data.dataset=imagefolder-path",
            'data.augment={"hflip": false}',
            "optim.lr=0.01",
        ],
    )
    assert recipe["train"]["micro_batch_size"] == 32 and recipe["model"]["pretrained"] is None
    assert recipe["data"]["dataset"] == "imagefolder-path" and recipe["optim"]["lr"] == 0.01
    assert recipe["data"]["augment"]["hflip"] is False and recipe["data"]["augment"]["crop_scale"] == [0.05, 1.0]


@pytest.mark.parametrize(
    "raw, overrides, message",
    [
        ({"train": {"micro_batch": 3}}, [], "train.micro_batch: unknown field"),
        ({"optim": {"lr": "fast"}}, [], 'optim.lr: expected an integer or a number, got "fast"'),
        ({"train": {"seed": True}}, [], "train.seed: expected an integer, got true"),
        ({"optim": {"name": "lamb"}}, [], "optim.name: expected one of sgd, adamw"),
        ({"schedule": {"total_steps": 0}}, [], "schedule.total_steps: must be positive"),
        ({}, ["train.global_batch_size=100"], "train.global_batch_size: 100 is not a multiple of"),
        ({"schedule": {"warmup_steps": 20, "total_steps": 10}}, [], "schedule.warmup_steps"),
        ({"hub": {"push": True}}, [], "hub.model_id"),
        ({"data": {"augment": {"rand_augment": {"num_ops": 2}, "trivial_augment": True}}}, [], "not both"),
        ({"data": {"augment": {"crop_scale": [0.5, 0.1]}}}, [], "data.augment.crop_scale"),
        ({"data": {"train_split": None}}, [], "data.train_split"),
        ({}, ["train"], "--set train: expected key.sub=value"),
        ({"model": "ViT-B_16"}, [], "model: expected an object"),
        ({"data": {"class_names": ["cat", "cat"]}}, [], "data.class_names: expected two or more distinct"),
        ({"data": {"class_names": ["cat"]}}, [], "data.class_names: expected two or more distinct"),
        ({"data": {"class_names": ["cat", 3]}}, [], "data.class_names: expected two or more distinct"),
        ({"data": {"split_order": "random"}}, [], 'data.split_order: expected one of shuffled, stored, got "random"'),
        ({"data": {"split_seed": 1.5}}, [], "data.split_seed: expected an integer, got 1.5"),
    ],
)
def test_bad_recipes_are_refused_naming_the_field(raw, overrides, message):
    with pytest.raises(UserError) as error:
        resolve_recipe(raw, overrides)
    assert message in str(error.value)


def test_accumulation_is_derived_from_processes_and_micro_batch():
    recipe = resolve_recipe({"train": {"global_batch_size": 512, "micro_batch_size": 64}})
    assert accumulation_steps(recipe, 1) == 8
    assert accumulation_steps(recipe, 2) == 4
    assert accumulation_steps(recipe, 8) == 1
    with pytest.raises(UserError, match="not divisible by micro_batch_size 64 x 3 processes"):
        accumulation_steps(recipe, 3)


def test_recipe_file_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(UserError, match="broken.json: not valid JSON"):
        load_recipe(broken)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"trian": {}}))
    with pytest.raises(UserError, match="unknown.json: trian: unknown field"):
        load_recipe(unknown)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('model.config={"num_hidden_layers": 9}', "model.config.num_hidden_layers: fixed by the pretrained checkpoint"),
        ("model.config.patch_size=8", "model.config.patch_size: fixed by the pretrained checkpoint"),
        ("model.config.attention_probs_dropout_prob=1.5", "model.config.attention_probs_dropout_prob: expected a num"),
    ],
)
def test_model_config_beside_a_checkpoint_refuses_what_the_checkpoint_fixes(override, message):
    with pytest.raises(UserError, match=re.escape(f"--set {override}: {message}")):
        load_recipe(CIFAR10, [override])
    # The dropout rates apply (tests/models/test_model.py checks them on the model).
    recipe = load_recipe(CIFAR10, ["model.config.attention_probs_dropout_prob=0.3"])
    assert recipe["model"]["config"] == {"attention_probs_dropout_prob": 0.3}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.seed=abc"], '--set train.seed=abc: train.seed: expected an integer, got "abc"'),
        (["train.micro_batch_size=7"], "--set train.micro_batch_size=7: train.global_batch_size: "),
        (
            ["model.image_size=30"],
            "--set model.image_size=30: model.image_size: 30 is not divisible by the patch size 16",
        ),
        (
            ["model.pretrained=augreg/S_32", "model.image_size=48"],
            "--set model.image_size=48: model.image_size: 48 is not divisible by the patch size 32",
        ),
        (['data={"dataset": 3}'], '--set data={"dataset": 3}: data.dataset: expected a string or an object, got 3'),
    ],
)
def test_a_bad_set_value_is_blamed_on_the_set_not_the_recipe_file(overrides, message):
    with pytest.raises(UserError) as error:
        load_recipe(CIFAR10, overrides)
    assert str(error.value).startswith(message), str(error.value)


def test_a_bad_field_in_the_file_is_still_blamed_on_the_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"train": {"seed": "abc"}}))
    with pytest.raises(UserError, match=re.escape(f'{path}: train.seed: expected an integer, got "abc"')):
        load_recipe(path, ["train.log_every=5"])
