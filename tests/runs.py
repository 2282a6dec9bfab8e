"""Tiny runs of the loop for the tests: a from-scratch ViT of seconds on real CIFAR-10 rows, and what a run wrote."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch import offline_env, run_module
from safetensors.torch import load_file
from transformers import ViTForImageClassification

from vit_hf.recipe import resolve_recipe
from vit_hf.training.loop import run

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "patch_size": 8,
}


def tiny_recipe(cifar10_dir: Path, out: Path, **sections) -> dict:
    """A from-scratch ViT small enough for seconds of CPU, on real CIFAR-10 rows."""
    recipe = {
        "name": "test",
        "model": {"pretrained": None, "image_size": 32, "config": TINY_VIT},
        "data": {
            "dataset": {
                "path": "parquet",
                "data_files": {"train": str(cifar10_dir / "train.parquet"), "test": str(cifar10_dir / "test.parquet")},
            },
            "train_split": "train[:512]",
            "eval_split": "train[2000:2301]",  # 301 rows: divisible by neither 2 processes nor the batch
            "test_split": "test[:200]",
            "augment": None,
            "num_workers": 0,
        },
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "schedule": {"name": "cosine", "warmup_steps": 2, "total_steps": 6},
        "train": {
            "global_batch_size": 32,
            "micro_batch_size": 32,
            "eval_batch_size": 16,
            "eval_every": 3,
            "save_every": 3,
            "log_every": 2,
            "mixed_precision": "no",
        },
        "output": {"dir": str(out)},
    }
    for section, values in sections.items():
        recipe[section] = recipe.get(section, {}) | values
    return recipe


def write_recipe(tmp_path: Path, recipe: dict, name: str = "recipe.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(recipe))
    return path


def finetune(recipe_path: Path, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    return run_module("vit_hf.finetune", [str(recipe_path), *args], processes=processes)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def train_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def run_here(recipe: dict, resume: str | None = None) -> dict:
    """The loop in this process, without TensorBoard: no process start-up of its own, for tests not about the CLI."""
    return run(resolve_recipe(recipe | {"train": recipe["train"] | {"report_to": []}}), resume=resume)


def assert_lr_is_warmup_then_cosine(out: Path, base: float, warmup: int, total: int) -> None:
    """Every update's logged lr is the one it used: update s (1-based) runs at the schedule of s - 1 updates done,
    linear from 0 over the warmup, then cosine to 0 at `total` (vit_jax's create_learning_rate_schedule)."""
    rows = train_rows(out)
    assert [row["step"] for row in rows] == list(range(1, total + 1))
    for row in rows:
        done = row["step"] - 1
        if done < warmup:
            expected = base * done / warmup
        else:
            expected = base * 0.5 * (1 + math.cos(math.pi * (done - warmup) / (total - warmup)))
        assert row["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-12), row


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def loaded_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """A model folder's weights as `from_pretrained` loads them, under the module's names (a checkpoint's, not the
    legacy names `save_pretrained` writes)."""
    return ViTForImageClassification.from_pretrained(model_dir).state_dict()


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# --- the loop, end to end ------------------------------------------------------------------------------


def kill_once_saved(recipe_path: Path, checkpoint: Path) -> None:
    """Start `python -m vit_hf.finetune RECIPE_PATH` and SIGKILL it as soon as CHECKPOINT exists."""
    process = subprocess.Popen([sys.executable, "-m", "vit_hf.finetune", str(recipe_path)], env=offline_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
