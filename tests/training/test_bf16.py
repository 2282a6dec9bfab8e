"""bf16 end to end, the precision every GPU recipe trains in, on CPU autocast: the loss trace against float32, two
processes, FSDP with its mixed-precision policy, a SIGKILL and resume, the float32 export; fp16, refused on the CPU;
what results.json says ran."""

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from launch import free_port, offline_env
from PIL import Image
from runs import (
    CIFAR10_CLASSES,
    assert_same_weights,
    finetune,
    kill_once_saved,
    losses,
    run_here,
    tiny_recipe,
    weights,
    write_recipe,
)
from transformers import pipeline

from vit_hf.recipe import resolve_recipe
from vit_hf.training.loop import FineTune
from vit_hf.training.results import training_results
from vit_hf.utils.errors import UserError

BF16 = {"mixed_precision": "bf16", "report_to": []}
FSDP_CONFIG = Path(__file__).resolve().parents[2] / "accelerate_configs" / "fsdp.yaml"


def fresh_accelerate() -> None:
    """Forget the process's Accelerate state: it keeps the first run's precision and compilation for good."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def own_accelerate_state() -> Iterator[None]:
    """Each test sets its runs' precision, and leaves the other tests of this process theirs."""
    fresh_accelerate()
    yield
    fresh_accelerate()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Compute as a run's own process does (launch.offline_env: one thread), so that a trace can match its bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_float32_export_serves_cifar_names(out, cifar10_dir) -> None:
    assert {tensor.dtype for tensor in weights(out).values()} == {torch.float32}
    classifier = pipeline("image-classification", model=str(out))
    row = pq.read_table(cifar10_dir / "test.parquet").slice(0, 1).to_pylist()[0]
    predictions = classifier(Image.open(io.BytesIO(row["img"]["bytes"])), top_k=3)
    assert len(predictions) == 3 and all(p["label"] in CIFAR10_CLASSES for p in predictions)


@pytest.fixture(scope="module")
def bf16_run(cifar10_dir, tmp_path_factory):
    """The reference recipe of the loop's tests (6 updates of 32, minival and test) in bf16, one process."""
    out = tmp_path_factory.mktemp("bf16") / "out"
    fresh_accelerate()
    results = run_here(tiny_recipe(cifar10_dir, out, train=BF16))
    fresh_accelerate()
    return out, results


@pytest.fixture(scope="module")
def two_process_bf16_run(cifar10_dir, tmp_path_factory):
    """The same in micro-batches of 8 on two gloo processes."""
    tmp_path = tmp_path_factory.mktemp("bf16_ddp")
    out = tmp_path / "out"
    result = finetune(
        write_recipe(tmp_path, tiny_recipe(cifar10_dir, out, train=BF16 | {"micro_batch_size": 8})), processes=2
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_bf16_run_differs_from_float32_stays_close_and_exports_float32(bf16_run, cifar10_dir, tmp_path):
    out, results = bf16_run
    float32 = tmp_path / "float32"
    run_here(tiny_recipe(cifar10_dir, float32, data={"test_split": None}, train={"report_to": []}))
    assert results["mixed_precision"] == "bf16" and results["compiled"] is False
    difference = max(abs(a - b) for a, b in zip(losses(out), losses(float32), strict=True))
    assert 1e-5 < difference < 0.01  # autocast rounds matmuls to bf16's 8 bits: a trace of its own, near float32's
    assert_float32_export_serves_cifar_names(out, cifar10_dir)


@pytest.mark.slow
def test_two_processes_in_bf16_count_every_eval_sample_once(two_process_bf16_run, bf16_run):
    results = json.loads((two_process_bf16_run / "results.json").read_text())
    assert (results["num_processes"], results["mixed_precision"]) == (2, "bf16")
    assert results["eval_samples"] == 301 and results["test_samples"] == 200
    assert losses(two_process_bf16_run) == pytest.approx(losses(bf16_run[0]), abs=1e-3)


@pytest.mark.slow
def test_fsdp_trains_in_bf16_with_its_mixed_precision_policy_and_auto_micro_batches(
    two_process_bf16_run, cifar10_dir, tmp_path
):
    out = tmp_path / "out"
    # "auto" measures the sharded model: all of a process's 16 images fit.
    recipe = tiny_recipe(cifar10_dir, out, train=BF16 | {"micro_batch_size": "auto"})
    # The project's FSDP config as it is (bf16), on two CPU processes (test_fsdp.py shows the sharding).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", "2", "--main_process_port", str(free_port()),
               "-m", "vit_hf.finetune", str(write_recipe(tmp_path, recipe))]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["distributed"], results["mixed_precision"]) == ("FSDP", "bf16")
    assert (results["micro_batch_size"], results["micro_batch_size_auto"]) == (16, True)
    assert results["eval_samples"] == 301 and results["test_samples"] == 200
    assert losses(out) == pytest.approx(losses(two_process_bf16_run), abs=3e-3)
    assert_float32_export_serves_cifar_names(out, cifar10_dir)


@pytest.mark.slow
def test_resume_after_sigkill_in_bf16_with_bf16_momentum_and_ema_reaches_the_unbroken_weights(cifar10_dir, tmp_path):
    # Micro-batches of 32, 3 updates an epoch of 200 rows, checkpoints every 2 updates: mid-epoch. Autocast, the
    # bf16 momentum, the weight average and the augmentation's draws must all continue exactly.
    sections = {
        "data": {"train_split": "train[:200]", "eval_split": None, "test_split": None},
        "optim": {"momentum_dtype": "bfloat16"},
        "train": BF16
        | {"global_batch_size": 64, "micro_batch_size": 32, "save_every": 2, "log_every": 1}
        | {"ema_decay": 0.9},
        "schedule": {"name": "cosine", "warmup_steps": 2, "total_steps": 12},
    }
    sections["data"]["augment"] = {"crop_scale": [0.3, 1.0], "hflip": True}
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    with one_thread():
        run_here(tiny_recipe(cifar10_dir, unbroken, **sections))
    recipe = write_recipe(tmp_path, tiny_recipe(cifar10_dir, broken, **sections))
    kill_once_saved(recipe, broken / "checkpoints" / "step_2")
    assert not (broken / "results.json").exists()

    fresh_accelerate()
    with one_thread():
        run_here(tiny_recipe(cifar10_dir, broken, **sections), resume="auto")
    assert losses(broken) == pytest.approx(losses(unbroken), abs=1e-6)
    final = [run / "checkpoints" / "step_12" for run in (unbroken, broken)]
    assert_same_weights(*(weights(checkpoint) for checkpoint in final), 1e-6)
    averages = [torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=True) for checkpoint in final]
    assert averages[0]["updates"] == averages[1]["updates"] == 12
    assert_same_weights(averages[0]["weights"], averages[1]["weights"], 1e-6)


def test_fp16_is_refused_on_the_cpu_in_one_line_naming_the_field(cifar10_dir, tmp_path):
    recipe = tiny_recipe(cifar10_dir, tmp_path / "out", train={"mixed_precision": "fp16", "report_to": []})
    with pytest.raises(UserError) as refused:
        FineTune(resolve_recipe(recipe))
    assert str(refused.value) == (
        'train.mixed_precision: "fp16" needs a GPU (on the CPU Accelerate runs it as float32, without a gradient '
        'scaler); use "bf16", which the CPU autocasts, or "no"'
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_results_record_the_compilation_that_accelerate_ran_not_the_recipes(cifar10_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")  # `accelerate launch --dynamo_backend inductor`
    recipe = tiny_recipe(cifar10_dir, tmp_path / "out", train=BF16 | {"compile": False})
    job = FineTune(resolve_recipe(recipe))
    results = training_results(
        job.recipe, job.splits, job.accelerator, job.model, job.progress,
        updates=0, train_started=0.0, train_seconds=1.0, micro_batch_auto=False,
    )  # fmt: skip
    assert (results["compiled"], results["mixed_precision"]) == (True, "bf16")
