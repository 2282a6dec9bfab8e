"""The fine-tuning loop, run for real: CLI processes, two gloo processes, kills and resumes, real CIFAR-10."""

import io
import json
import math
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from launch import offline_env, run_module
from PIL import Image
from safetensors.torch import load_file
from transformers import ViTConfig, ViTForImageClassification, pipeline

from vit_hf.finetune import make_optimizer, make_schedule
from vit_hf.recipe import resolve_recipe

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


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# --- the schedule --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_schedule_is_the_official_formula_of_the_update_count(name):
    base, warmup, total = 0.03, 50, 400
    model = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(model, resolve_recipe({})["optim"] | {"lr": base})
    scheduler = make_schedule(optimizer, {"name": name, "warmup_steps": warmup, "total_steps": total})
    for step in range(total + 1):
        # vit_jax.utils.create_learning_rate_schedule, with decay to zero.
        progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1 - progress
        expected = base * decay * min(1.0, step / warmup)
        assert scheduler.get_last_lr()[0] == pytest.approx(expected, abs=1e-12), step
        optimizer.step()
        scheduler.step()


def test_sgd_has_no_weight_decay_on_biases_norms_and_embeddings():
    model = ViTForImageClassification(ViTConfig(image_size=32, num_labels=3, **TINY_VIT))
    optimizer = make_optimizer(model, resolve_recipe({})["optim"] | {"weight_decay": 0.1})
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    for name, param in model.named_parameters():
        exempt = param.ndim <= 1 or "position_embeddings" in name or "cls_token" in name
        assert (id(param) not in decayed) == exempt, name


# --- the loop, end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(cifar10_dir, tmp_path_factory):
    """One process, one batch of 32 an update, no augmentation: the trace the others must reproduce."""
    tmp_path = tmp_path_factory.mktemp("reference")
    out = tmp_path / "out"
    result = finetune(write_recipe(tmp_path, tiny_recipe(cifar10_dir, out)))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_run_writes_model_recipe_results_and_counts_every_eval_sample_once(reference_run):
    out = reference_run
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "recipe.json", "results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 6 and results["eval_samples"] == 301 and results["test_samples"] == 200
    for key in ("eval_accuracy", "test_accuracy", "train_samples_per_second", "wall_seconds"):
        assert isinstance(results[key], float), key
    assert json.loads((out / "config.json").read_text())["id2label"]["9"] == "truck"
    assert json.loads((out / "recipe.json").read_text())["schedule"]["total_steps"] == 6
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    assert len(losses(out)) == 6


@pytest.mark.slow
def test_accumulating_4_micro_batches_of_8_equals_one_batch_of_32(reference_run, cifar10_dir, tmp_path):
    out = tmp_path / "out"
    recipe = tiny_recipe(cifar10_dir, out, train={"micro_batch_size": 8})
    result = finetune(write_recipe(tmp_path, recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(reference_run), abs=1e-5)
    assert_same_weights(
        weights(out / "checkpoints" / "step_6"), weights(reference_run / "checkpoints" / "step_6"), 1e-5
    )


@pytest.mark.slow
def test_two_processes_give_the_loss_trace_of_one_and_count_eval_samples_once(reference_run, cifar10_dir, tmp_path):
    out = tmp_path / "out"
    recipe = tiny_recipe(cifar10_dir, out, train={"micro_batch_size": 8})  # 8 x 2 processes x 2 accumulation
    result = finetune(write_recipe(tmp_path, recipe), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2
    assert results["eval_samples"] == 301 and results["test_samples"] == 200
    reference = json.loads((reference_run / "results.json").read_text())
    assert results["eval_accuracy"] == pytest.approx(reference["eval_accuracy"], abs=1 / 301)
    assert losses(out) == pytest.approx(losses(reference_run), abs=1e-5)
    assert_same_weights(
        weights(out / "checkpoints" / "step_6"), weights(reference_run / "checkpoints" / "step_6"), 1e-5
    )


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_weights_and_losses_of_an_unbroken_run(cifar10_dir, tmp_path):
    # 200 rows, micro-batches of 32 (drop_last): 6 a epoch, 3 updates of 64; checkpoints every 2 updates fall
    # mid-epoch. 40 updates leave the kill time to land while the run goes on. Augmentation is on, so the random
    # crops and flips must continue exactly too.
    sections = {
        "data": {"train_split": "train[:200]", "eval_split": None, "augment": {"crop_scale": [0.3, 1.0]}},
        "train": {"global_batch_size": 64, "micro_batch_size": 32, "save_every": 2, "log_every": 1},
        "schedule": {"name": "cosine", "warmup_steps": 2, "total_steps": 40},
    }
    unbroken = tmp_path / "unbroken"
    result = finetune(write_recipe(tmp_path, tiny_recipe(cifar10_dir, unbroken, **sections), "a.json"))
    assert result.returncode == 0, result.stderr[-3000:]

    broken = tmp_path / "broken"
    recipe = write_recipe(tmp_path, tiny_recipe(cifar10_dir, broken, **sections), "b.json")
    process = subprocess.Popen(
        [sys.executable, "-m", "vit_hf.finetune", str(recipe)],
        env=offline_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while not (broken / "checkpoints" / "step_2").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (broken / "results.json").exists()

    result = finetune(recipe, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    assert losses(broken) == pytest.approx(losses(unbroken), abs=1e-6)
    assert_same_weights(
        weights(broken / "checkpoints" / "step_40"), weights(unbroken / "checkpoints" / "step_40"), 1e-6
    )


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    sections = {
        "schedule": {"name": "cosine", "warmup_steps": 2, "total_steps": 1000},
        "train": {"save_every": 1000},  # the only checkpoint is the one SIGTERM asks for
        "data": {"eval_split": None},
    }
    recipe = write_recipe(tmp_path, tiny_recipe(cifar10_dir, out, **sections))
    process = subprocess.Popen(
        [sys.executable, "-m", "vit_hf.finetune", str(recipe)],
        env=offline_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (out / "train_log.jsonl").exists() or not (out / "train_log.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in stderr
    saved = list((out / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and 0 < int(saved[0].name.split("_")[1]) < 1000


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    sections = {
        "optim": {"name": "sgd", "lr": 1e30, "momentum": 0.0, "max_grad_norm": None},
        "schedule": {"name": "cosine", "warmup_steps": 0, "total_steps": 6},
        "train": {"save_every": 1, "log_every": 1},
        "data": {"eval_split": None},
    }
    result = finetune(write_recipe(tmp_path, tiny_recipe(cifar10_dir, out, **sections)))
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "NaN or infinite" in error[0] and "Traceback" not in result.stderr
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert saved and (out / "checkpoints" / f"step_{saved[-1]}" / "model.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".step_*"))


def test_bad_recipe_is_one_line_exit_2_before_anything_starts(tmp_path):
    recipe = write_recipe(tmp_path, {"train": {"micro_batch_size": "big"}, "output": {"dir": str(tmp_path / "o")}})
    result = finetune(recipe)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'error: {recipe}: train.micro_batch_size: expected an integer, got "big"'
    ]
    assert not (tmp_path / "o").exists()


# --- learning --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_vit_from_scratch_learns_real_cifar10(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    recipe = tiny_recipe(
        cifar10_dir,
        out,
        model={
            "pretrained": None,
            "image_size": 32,
            "config": {
                "hidden_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "intermediate_size": 128,
                "patch_size": 4,
            },
        },  # fmt: skip
        data={
            "train_split": "train[:5000]",
            "eval_split": "train[5000:5500]",
            "test_split": "test[:1000]",
            "augment": {"crop_scale": [0.5, 1.0], "hflip": True},
        },  # fmt: skip
        optim={"name": "adamw", "lr": 0.002, "weight_decay": 0.05, "max_grad_norm": 1.0},
        schedule={"name": "cosine", "warmup_steps": 20, "total_steps": 400},
        train={
            "global_batch_size": 64,
            "micro_batch_size": 64,
            "eval_batch_size": 250,
            "eval_every": 125,
            "save_every": 250,
            "log_every": 25,
        },  # fmt: skip
    )
    result = finetune(write_recipe(tmp_path, recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["test_samples"] == 1000
    assert results["test_accuracy"] > 0.3  # chance is 0.1


@pytest.mark.slow
def test_fine_tuning_a_converted_official_checkpoint_serves_cifar_names(cifar10_dir, jax_reference_dir, tmp_path):
    out = tmp_path / "out"
    recipe = tiny_recipe(
        cifar10_dir,
        out,
        model={"pretrained": str(jax_reference_dir / "tiny_token.npz"), "image_size": 32, "config": {}},
        data={"augment": {"crop_scale": [0.05, 1.0], "hflip": True}},
    )
    result = finetune(write_recipe(tmp_path, recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu_pytorch_tanh"
    classifier = pipeline("image-classification", model=str(out))
    rows = pq.read_table(cifar10_dir / "test.parquet").slice(0, 3).to_pylist()
    for row in rows:
        predictions = classifier(Image.open(io.BytesIO(row["img"]["bytes"])), top_k=3)
        assert all(p["label"] in CIFAR10_CLASSES for p in predictions)


@pytest.mark.slow
def test_from_scratch_augmentations_run_in_the_loop(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    augment = {
        "crop_scale": [0.35, 1.0],
        "rand_augment": {"num_ops": 2, "magnitude": 9},
        "random_erasing": 0.25,
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
    }
    recipe = tiny_recipe(
        cifar10_dir,
        out,
        data={"augment": augment, "eval_split": None},
        optim={"name": "adamw", "lr": 0.001, "weight_decay": 0.05},
        train={"label_smoothing": 0.1, "log_every": 1},
    )
    result = finetune(write_recipe(tmp_path, recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    trace = losses(out)
    assert len(trace) == 6 and all(math.isfinite(loss) for loss in trace)
    # Soft targets keep the loss above that of a confident right answer: the smoothed entropy floor.
    assert min(trace) > 0.1


@pytest.mark.slow
def test_torchrun_with_two_processes_trains_and_counts_eval_samples_once(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_recipe(cifar10_dir, out, train={"micro_batch_size": 16}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               "-m", "vit_hf.finetune", str(recipe)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2 and results["eval_samples"] == 301 and results["step"] == 6
