"""FSDP that really shards, on two gloo processes on the CPU: the same training as DDP, sharded state on disk, the
best model, export, test score and resume through full state dicts."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch import free_port, offline_env
from runs import assert_same_weights, loaded_weights, losses, tiny_recipe, write_recipe

REPO = Path(__file__).resolve().parents[2]

# Two micro-batches of 16 on each process an update (accumulation), minival every 3 updates, checkpoints at 3 and 6.
SECTIONS = {
    "train": {"global_batch_size": 64, "micro_batch_size": 16, "save_every": 3, "log_every": 1, "report_to": []},
}


def launch_fsdp(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` with the project's FSDP config on two CPU processes (fp32: the DDP run's precision)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_port", str(free_port()), "-m", "vit_hf.finetune", str(recipe), *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=300)


def launch_ddp(recipe: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "vit_hf.finetune", str(recipe)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=300)


@pytest.fixture(scope="module")
def fsdp_run(cifar10_dir, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("fsdp")
    out = tmp_path / "out"
    result = launch_fsdp(write_recipe(tmp_path, tiny_recipe(cifar10_dir, out, **SECTIONS)))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_fsdp_shards_the_parameters_and_trains_as_ddp_does(fsdp_run, cifar10_dir, tmp_path):
    ddp = tmp_path / "ddp"
    result = launch_ddp(write_recipe(tmp_path, tiny_recipe(cifar10_dir, ddp, **SECTIONS)))
    assert result.returncode == 0, result.stderr[-3000:]

    results, ddp_results = (json.loads((out / "results.json").read_text()) for out in (fsdp_run, ddp))
    assert (results["distributed"], ddp_results["distributed"]) == ("FSDP", "MULTI_CPU")
    # Each process holds about half of every parameter (the first dimension split in two), DDP a whole copy.
    assert results["total_parameters"] == ddp_results["main_process_parameters"] == ddp_results["total_parameters"]
    assert 0.45 < results["main_process_parameters"] / results["total_parameters"] < 0.55
    # The checkpoints are sharded: one file of the model and one of the optimizer from each process, no full copy.
    step_3 = fsdp_run / "checkpoints" / "step_3"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (step_3 / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step_3 / "model.safetensors").exists()

    assert losses(fsdp_run) == pytest.approx(losses(ddp), abs=1e-5)
    assert_same_weights(loaded_weights(fsdp_run), loaded_weights(ddp), 1e-5)  # the exported best on minival
    assert_same_weights(loaded_weights(fsdp_run / "checkpoints" / "best"), loaded_weights(fsdp_run), 0)
    for key in ("best_step", "eval_samples", "test_samples", "eval_accuracy", "test_accuracy"):
        assert results[key] == ddp_results[key], key
    assert results["eval_samples"] == 301 and results["test_samples"] == 200  # each sample counted once


@pytest.mark.slow
def test_an_fsdp_run_resumes_from_its_sharded_checkpoint_to_the_unbroken_weights(fsdp_run, cifar10_dir, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp_run / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    result = launch_fsdp(write_recipe(tmp_path, tiny_recipe(cifar10_dir, resumed, **SECTIONS)), "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 3" in result.stdout + result.stderr
    assert losses(resumed) == pytest.approx(losses(fsdp_run)[3:], abs=1e-6)
    assert_same_weights(loaded_weights(resumed), loaded_weights(fsdp_run), 1e-6)


@pytest.mark.slow
def test_fsdp_refuses_the_weight_average_in_one_line(cifar10_dir, tmp_path):
    recipe = tiny_recipe(cifar10_dir, tmp_path / "out", **SECTIONS)
    recipe["train"] |= {"ema_decay": 0.9}
    result = launch_fsdp(write_recipe(tmp_path, recipe))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        "error: train.ema_decay: the weight average keeps a whole copy of the model on every process, which FSDP "
        "exists to avoid: set it to null, or train with DDP"
    ]
