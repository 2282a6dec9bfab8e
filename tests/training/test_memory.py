"""`train.micro_batch_size: "auto"`: the largest micro-batch that fits, found on a device that runs out of memory
above a known size (simulated by a model whose training forward raises torch.OutOfMemoryError)."""

import json
import os

import pytest
import torch
from launch import run_module
from runs import losses, tiny_recipe, weights, write_recipe
from transformers import ViTForImageClassification

from vit_hf.recipe import resolve_recipe
from vit_hf.training import memory
from vit_hf.training.loop import FineTune, run
from vit_hf.training.memory import micro_batch_candidates
from vit_hf.utils.errors import UserError

# Imported by every Python process that has its folder on PYTHONPATH: a device with room for LIMIT images, where
# LIMIT may differ per process rank.
SITECUSTOMIZE = """
import os
import torch
from transformers import ViTForImageClassification

_forward = ViTForImageClassification.forward
_limits = [int(n) for n in os.environ["FAKE_MEMORY_LIMITS"].split(",")]


def forward(self, pixel_values=None, **kwargs):
    limit = _limits[int(os.environ.get("RANK", "0"))]
    if self.training and pixel_values.shape[0] > limit:
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {pixel_values.shape[0]} images")
    return _forward(self, pixel_values=pixel_values, **kwargs)


ViTForImageClassification.forward = forward
"""


def test_candidates_are_the_divisors_of_the_per_process_batch_largest_first():
    assert micro_batch_candidates(32) == [32, 16, 8, 4, 2, 1]
    assert micro_batch_candidates(24) == [24, 12, 8, 6, 4, 3, 2, 1]
    assert micro_batch_candidates(7) == [7, 1]


@pytest.mark.parametrize(
    "value, message",
    [("autoo", 'train.micro_batch_size: expected a positive integer or "auto", got "autoo"'),
     (0, 'train.micro_batch_size: expected a positive integer or "auto", got 0')],
)  # fmt: skip
def test_a_misspelt_auto_is_refused_naming_the_field(value, message):
    with pytest.raises(Exception, match="train.micro_batch_size") as error:
        resolve_recipe({"train": {"micro_batch_size": value}})
    assert str(error.value) == message


def _limited_forward(limit: int):
    original = ViTForImageClassification.forward

    def forward(self, pixel_values=None, **kwargs):
        if self.training and pixel_values.shape[0] > limit:
            raise torch.OutOfMemoryError(f"out of memory: {pixel_values.shape[0]} images")
        return original(self, pixel_values=pixel_values, **kwargs)

    return forward


@pytest.mark.slow
def test_auto_picks_the_largest_that_fits_and_trains_as_that_size_given_by_hand(cifar10_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ViTForImageClassification, "forward", _limited_forward(6))
    sections = {"data": {"eval_split": None, "test_split": None}}
    auto = resolve_recipe(tiny_recipe(cifar10_dir, tmp_path / "auto", train={"micro_batch_size": "auto"}, **sections))
    by_hand = resolve_recipe(tiny_recipe(cifar10_dir, tmp_path / "hand", train={"micro_batch_size": 4}, **sections))

    results = run(auto)
    run(by_hand)

    # Global batch 32 on one process: 32, 16 and 8 do not fit under 6 images, 4 does (and divides 32).
    assert results["micro_batch_size"] == 4 and results["accumulation_steps"] == 8
    assert results["micro_batch_size_auto"] is True
    assert json.loads((tmp_path / "auto" / "recipe.json").read_text())["train"]["micro_batch_size"] == 4
    assert losses(tmp_path / "auto") == losses(tmp_path / "hand")  # same arithmetic, bit for bit


@pytest.mark.slow
def test_two_processes_agree_on_the_size_that_fits_on_both(cifar10_dir, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "out"
    recipe = tiny_recipe(cifar10_dir, out, train={"micro_batch_size": "auto"}, data={"eval_split": None})
    path = write_recipe(tmp_path, recipe)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    # Rank 0 has room for 8 images, rank 1 for 5: of 16, 8, 4, ... only 4 fits on both.
    result = run_module("vit_hf.finetune", [str(path)], processes=2, env=env | {"FAKE_MEMORY_LIMITS": "8,5"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["micro_batch_size"] == 4 and results["accumulation_steps"] == 4 and results["num_processes"] == 2
    assert "micro-batch 4 x 4 accumulation steps (auto)" in result.stdout + result.stderr


@pytest.mark.slow
def test_gradient_checkpointing_reaches_the_weights_of_the_run_without_it(cifar10_dir, tmp_path):
    sections = {"data": {"eval_split": None, "test_split": None, "augment": {"crop_scale": [0.5, 1.0]}}}
    plain = resolve_recipe(tiny_recipe(cifar10_dir, tmp_path / "plain", **sections))
    checkpointed = resolve_recipe(
        tiny_recipe(cifar10_dir, tmp_path / "ckpt", train={"gradient_checkpointing": True}, **sections)
    )
    run(plain)
    run(checkpointed)

    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)
    a, b = weights(tmp_path / "plain" / "checkpoints" / "step_6"), weights(tmp_path / "ckpt" / "checkpoints" / "step_6")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture
def measured(monkeypatch) -> list[tuple[torch.nn.Module, int, int]]:
    """The trial steps of the search, as (model, micro-batch, peak bytes)."""
    trials, measure = [], memory.step_peak

    def step_peak(model, recipe, accelerator, size):
        trials.append((model, size, measure(model, recipe, accelerator, size)))
        return trials[-1][2]

    monkeypatch.setattr(memory, "step_peak", step_peak)
    return trials


def auto_setup(cifar10_dir, out, monkeypatch, free: float, **train) -> FineTune:
    """The run's set-up with train.micro_batch_size "auto" on a device with FREE bytes free."""
    monkeypatch.setattr(memory, "free_memory", lambda accelerator: int(free))
    sections = {"data": {"eval_split": None, "test_split": None}}
    recipe = tiny_recipe(cifar10_dir, out, train={"micro_batch_size": "auto", "report_to": [], **train}, **sections)
    return FineTune(resolve_recipe(recipe))


@pytest.mark.slow
def test_auto_measures_the_model_as_it_trains_so_gradient_checkpointing_lowers_the_peak(
    cifar10_dir, tmp_path, monkeypatch, measured
):
    plain = auto_setup(cifar10_dir, tmp_path / "plain", monkeypatch, free=1e12)
    [(model, size, plain_peak)] = measured
    assert model is plain.model and size == 32  # the prepared model; the whole per-process batch fits
    measured.clear()
    auto_setup(cifar10_dir, tmp_path / "ckpt", monkeypatch, free=1e12, gradient_checkpointing=True)
    [(_, _, checkpointed_peak)] = measured
    assert checkpointed_peak < 0.9 * plain_peak

    # Free memory where the checkpointed step of 32 fits, headroom kept, and the plain one does not.
    free = (plain_peak + checkpointed_peak) / 2 / (1 - memory.HEADROOM)
    measured.clear()
    narrow = auto_setup(cifar10_dir, tmp_path / "narrow", monkeypatch, free=free)
    assert [size for _, size, _ in measured] == [32, 16]
    assert (narrow.cfg["micro_batch_size"], narrow.accumulation) == (16, 2)
    checkpointed = auto_setup(cifar10_dir, tmp_path / "ckpt2", monkeypatch, free=free, gradient_checkpointing=True)
    assert (checkpointed.cfg["micro_batch_size"], checkpointed.accumulation) == (32, 1)


@pytest.mark.slow
def test_when_nothing_fits_the_advice_is_what_the_search_did_not_try(cifar10_dir, tmp_path, monkeypatch):
    with pytest.raises(UserError) as refused:
        auto_setup(cifar10_dir, tmp_path / "out", monkeypatch, free=1, gradient_checkpointing=True)
    assert str(refused.value) == (
        'train.micro_batch_size: "auto" found no micro-batch that fits (not even 1 image of 32 px, keeping 10% of '
        "the free memory spare); try a smaller model"
    )
