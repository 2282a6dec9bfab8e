"""The fine-tuning loop, run for real: CLI processes, two gloo processes, kills and resumes, real CIFAR-10."""

import io
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from launch import free_port, offline_env, run_module
from PIL import Image
from runs import (
    CIFAR10_CLASSES,
    TINY_VIT,
    assert_lr_is_warmup_then_cosine,
    assert_same_weights,
    finetune,
    kill_once_saved,
    loaded_weights,
    losses,
    run_here,
    tiny_recipe,
    train_rows,
    weights,
    write_recipe,
)  # fmt: skip
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification, pipeline

from vit_hf.recipe import resolve_recipe
from vit_hf.training.loop import FineTune


@pytest.fixture(scope="module")
def reference_run(cifar10_dir, tmp_path_factory):
    """One process, one batch of 32 an update, no augmentation: the trace the others must reproduce."""
    tmp_path = tmp_path_factory.mktemp("reference")
    out = tmp_path / "out"
    result = finetune(write_recipe(tmp_path, tiny_recipe(cifar10_dir, out)))
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "stderr.log").write_text(result.stderr)
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
def test_the_only_progress_bar_during_training_is_the_loops_own(reference_run):
    """transformers' save and load bars ("Writing model shards", "Loading weights") used to interleave with the
    training bar and leave cursor-up codes in logs."""
    stderr = (reference_run.parent / "stderr.log").read_text()
    assert "train: 100%" in stderr
    assert "Writing model shards" not in stderr and "Loading weights" not in stderr and "\x1b[A" not in stderr


@pytest.mark.slow
def test_accumulating_4_micro_batches_of_8_equals_one_batch_of_32(reference_run, cifar10_dir, tmp_path):
    out = tmp_path / "out"
    run_here(tiny_recipe(cifar10_dir, out, train={"micro_batch_size": 8}))
    assert losses(out) == pytest.approx(losses(reference_run), abs=1e-5)
    assert_same_weights(
        weights(out / "checkpoints" / "step_6"), weights(reference_run / "checkpoints" / "step_6"), 1e-5
    )
    assert_lr_is_warmup_then_cosine(out, base=0.05, warmup=2, total=6)


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
    assert_lr_is_warmup_then_cosine(out, base=0.05, warmup=2, total=6)


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_weights_and_losses_of_an_unbroken_run(cifar10_dir, tmp_path):
    # 200 rows, micro-batches of 32 (drop_last): 6 a epoch, 3 updates of 64; checkpoints every 2 updates fall
    # mid-epoch. 40 updates leave the kill time to land while the run goes on. Augmentation is on, so the random
    # crops and flips must continue exactly too; the momentum is kept in bfloat16 (the official default) and must
    # round-trip through the checkpoint as it is.
    sections = {
        "data": {"train_split": "train[:200]", "eval_split": None, "augment": {"crop_scale": [0.3, 1.0]}},
        "optim": {"momentum_dtype": "bfloat16"},
        "train": {"global_batch_size": 64, "micro_batch_size": 32, "save_every": 2, "log_every": 1},
        "schedule": {"name": "cosine", "warmup_steps": 2, "total_steps": 40},
    }
    unbroken = tmp_path / "unbroken"
    result = finetune(write_recipe(tmp_path, tiny_recipe(cifar10_dir, unbroken, **sections), "a.json"))
    assert result.returncode == 0, result.stderr[-3000:]

    broken = tmp_path / "broken"
    recipe = write_recipe(tmp_path, tiny_recipe(cifar10_dir, broken, **sections), "b.json")
    kill_once_saved(recipe, broken / "checkpoints" / "step_2")
    assert not (broken / "results.json").exists()

    result = finetune(recipe, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    assert losses(broken) == pytest.approx(losses(unbroken), abs=1e-6)
    assert_same_weights(
        weights(broken / "checkpoints" / "step_40"), weights(unbroken / "checkpoints" / "step_40"), 1e-6
    )
    momenta = [
        torch.load(out / "checkpoints" / "step_40" / "optimizer.bin", weights_only=True)["state"]
        for out in (broken, unbroken)
    ]
    assert {state["momentum_buffer"].dtype for state in momenta[0].values()} == {torch.bfloat16}
    assert_same_weights(*({k: v["momentum_buffer"] for k, v in state.items()} for state in momenta), 1e-6)


@pytest.mark.slow
def test_two_processes_resume_mid_epoch_2_to_the_weights_and_losses_of_an_unbroken_run(cifar10_dir, tmp_path):
    # 168 rows in micro-batches of 16 (drop_last): 10 a epoch, 5 for each of 2 processes; an update is 2 of them
    # on each (global batch 64), so updates 3 and 8 span two epochs, and the checkpoint after update 6 (12 micro-batches
    # a process) lies in epoch 2 after its first 2. Dropout and augmentation draw from every random stream.
    # Augmentation and dropout draw from one stream per process, so only as many processes as wrote the checkpoint
    # can continue it exactly: the unbroken run is the two-process one.
    sections = {
        "model": {"dropout": 0.1},
        "data": {
            "train_split": "train[:168]",
            "eval_split": None,
            "test_split": None,
            "augment": {"crop_scale": [0.3, 1.0], "hflip": True, "mixup_alpha": 0.8},
        },
        "train": {"global_batch_size": 64, "micro_batch_size": 16, "save_every": 3, "log_every": 1, "report_to": []},
        "schedule": {"name": "cosine", "warmup_steps": 2, "total_steps": 9},
    }
    unbroken = tmp_path / "unbroken"
    result = finetune(write_recipe(tmp_path, tiny_recipe(cifar10_dir, unbroken, **sections), "a.json"), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    progress = torch.load(unbroken / "checkpoints" / "step_6" / "custom_checkpoint_0.pkl", weights_only=True)
    assert (progress["step"], progress["epoch"], progress["batches_in_epoch"]) == (6, 2, 2)

    resumed = tmp_path / "resumed"
    shutil.copytree(unbroken / "checkpoints" / "step_6", resumed / "checkpoints" / "step_6")
    recipe = write_recipe(tmp_path, tiny_recipe(cifar10_dir, resumed, **sections), "b.json")
    result = finetune(recipe, "--resume", "auto", processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 6" in result.stdout + result.stderr
    assert [row["step"] for row in train_rows(resumed)] == [7, 8, 9]
    assert losses(resumed) == pytest.approx(losses(unbroken)[6:], abs=1e-6)
    assert_same_weights(weights(resumed / "checkpoints" / "step_9"), weights(unbroken / "checkpoints" / "step_9"), 1e-5)


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
    failing = int(re.search(r"by step (\d+)", error[0]).group(1))
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert saved and saved[-1] < failing
    last = out / "checkpoints" / f"step_{saved[-1]}"
    assert str(last) in error[0]  # the line names it
    for name, tensor in weights(last).items():
        assert torch.isfinite(tensor).all(), name
    assert not list((out / "checkpoints").glob(".step_*"))


def test_bad_recipe_is_one_line_exit_2_before_anything_starts(tmp_path):
    recipe = write_recipe(tmp_path, {"train": {"micro_batch_size": "big"}, "output": {"dir": str(tmp_path / "o")}})
    result = finetune(recipe)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'error: {recipe}: train.micro_batch_size: expected a positive integer or "auto", got "big"'
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
                "patch_size": 8,  # 16 tokens: a quarter of the compute of patch 4, and it learns faster here
            },
        },  # fmt: skip
        data={
            "train_split": "train[:5000]",
            "eval_split": "train[5000:5500]",
            "test_split": "test[:1000]",
            "augment": {"crop_scale": [0.5, 1.0], "hflip": True},
        },  # fmt: skip
        optim={"name": "adamw", "lr": 0.003, "weight_decay": 0.05, "max_grad_norm": 1.0},
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


FROM_SCRATCH_AUGMENT = {
    "crop_scale": [0.35, 1.0],
    "rand_augment": {"num_ops": 2, "magnitude": 9},
    "random_erasing": 0.25,
    "mixup_alpha": 0.8,
    "cutmix_alpha": 1.0,
}


@pytest.mark.slow
def test_from_scratch_augmentations_are_seeded_and_change_every_update(cifar10_dir, tmp_path):
    def recipe(out: Path, augment: dict | None) -> dict:
        return tiny_recipe(
            cifar10_dir,
            out,
            data={"augment": augment, "eval_split": None, "test_split": None},
            optim={"name": "adamw", "lr": 0.001, "weight_decay": 0.05},
            train={"label_smoothing": 0.1, "log_every": 1},
        )

    for name, augment in (("a", FROM_SCRATCH_AUGMENT), ("b", FROM_SCRATCH_AUGMENT), ("plain", None)):
        run_here(recipe(tmp_path / name, augment))
    trace = losses(tmp_path / "a")
    assert len(trace) == 6 and all(math.isfinite(loss) for loss in trace)
    assert losses(tmp_path / "b") == trace  # the same seed: the same draws, bit for bit
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"), atol=0)
    # The augmentations reach the model: every update saw other inputs than without them.
    assert all(a != plain for a, plain in zip(trace, losses(tmp_path / "plain"), strict=True))


@pytest.mark.slow
def test_torchrun_with_two_processes_trains_and_counts_eval_samples_once(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_recipe(cifar10_dir, out, train={"micro_batch_size": 16}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "vit_hf.finetune", str(recipe)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2 and results["eval_samples"] == 301 and results["step"] == 6


# --- what the run keeps and exports --------------------------------------------------------------------


def accuracy_of_model_folder(model_dir: Path, parquet: Path, rows: int) -> float:
    """Top-1 accuracy of a saved model folder on the first ROWS of a CIFAR parquet file, as a user would load it."""
    table = pq.read_table(parquet).slice(0, rows).to_pylist()
    images = [Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB") for row in table]
    labels = torch.tensor([row["label"] for row in table])
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        predictions = model(**processor(images, return_tensors="pt")).logits.argmax(-1)
    return (predictions == labels).float().mean().item()


@pytest.mark.slow
def test_the_exported_model_is_the_best_on_minival_and_the_test_split_is_scored_with_it(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    # A high learning rate and minival after every update: its accuracy goes up and down.
    recipe = tiny_recipe(
        cifar10_dir,
        out,
        optim={"name": "adamw", "lr": 0.03},
        schedule={"name": "cosine", "warmup_steps": 1, "total_steps": 8},
        train={"eval_every": 1, "save_every": 1, "keep_checkpoints": 8, "log_every": 4},
        data={"split_order": "stored"},  # test[:200] is the first 200 rows the independent reference reads
    )
    results = run_here(recipe)
    evals = [
        row for row in map(json.loads, (out / "eval_log.jsonl").read_text().splitlines()) if row["split"] == "eval"
    ]
    best = evals[0]
    for row in evals[1:]:
        if row["accuracy"] > best["accuracy"]:  # the first of equal scores is kept
            best = row
    # Only then does the test tell the best model from the last.
    assert best["step"] != 8, "minival is best at the last step: pick a recipe where it is not"

    assert results["best_step"] == best["step"]
    assert results["eval_accuracy"] == pytest.approx(best["accuracy"], abs=0.5 / 301)  # the same count of 301
    exported = (out / "model.safetensors").read_bytes()
    assert exported == (out / "checkpoints" / "best" / "model.safetensors").read_bytes()
    assert_same_weights(loaded_weights(out), weights(out / "checkpoints" / f"step_{best['step']}"), atol=0)

    independent = accuracy_of_model_folder(out, cifar10_dir / "test.parquet", 200)
    assert results["test_samples"] == 200
    assert results["test_accuracy"] == pytest.approx(independent, abs=1 / 200)


@pytest.mark.slow
def test_only_the_last_keep_checkpoints_remain(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    sections = {"data": {"eval_split": None, "test_split": None}}
    run_here(tiny_recipe(cifar10_dir, out, train={"save_every": 1, "keep_checkpoints": 2}, **sections))
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["best", "step_5", "step_6"]


# --- fast by construction ------------------------------------------------------------------------------

# Ops that make the host wait for the device on a GPU: a value read back (`.item()`, `float()`, `bool()`, `if t:`) and
# ops whose output size depends on the data. On a CPU they run all the same, and the profiler records them.
HOST_SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
}


@pytest.mark.slow
def test_an_update_with_every_augmentation_never_waits_for_the_device(cifar10_dir, tmp_path):
    recipe = tiny_recipe(
        cifar10_dir,
        tmp_path / "out",
        data={"augment": FROM_SCRATCH_AUGMENT | {"hflip": True}, "eval_split": None, "test_split": None},
        # 2 micro-batches an update; no log, minival or checkpoint falls in the updates profiled.
        train={"micro_batch_size": 16, "label_smoothing": 0.1, "report_to": []}
        | {"log_every": 100, "eval_every": 100, "save_every": 100},
    )
    job = FineTune(resolve_recipe(recipe))
    job.bar = tqdm(disable=True)  # set by `train`, which `update` assumes has started
    job.model.train()
    job.update()  # the first update allocates the optimizer state
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True) as prof:
        for _ in range(3):
            job.update()
    events = prof.events()
    assert any(event.name == "aten::convolution_backward" for event in events)  # the profiler saw the updates
    syncs = [
        f"{event.name} {event.input_shapes} at {[line for line in event.stack if 'site-packages' not in line][:4]}"
        for event in events
        if event.name in HOST_SYNC_OPS
    ]
    assert syncs == []
    assert job.progress.step == 4


@pytest.mark.slow
def test_compiled_training_gives_the_eager_loss_trace_and_exports_loadable_weights(
    reference_run, cifar10_dir, tmp_path
):
    # In a process of its own: Accelerate keeps the first Accelerator's dynamo setting for the whole process.
    # Inductor compiles its kernels in that process: on 2 cores a pool of compile workers costs more to start than
    # it saves (a cold kernel cache, as in CI: 55 s for this test instead of 73 s, 2026-12-02).
    out = tmp_path / "out"
    recipe = tiny_recipe(cifar10_dir, out, data={"eval_split": None, "test_split": None}, train={"compile": True})
    result = run_module(
        "vit_hf.finetune", [str(write_recipe(tmp_path, recipe))], env={"TORCHINDUCTOR_COMPILE_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Inductor fuses and reorders float32 arithmetic: equal within rounding, not bit for bit.
    assert losses(out) == pytest.approx(losses(reference_run), rel=1e-4)
    # The exported model (the last, without minival) has the weights of the last checkpoint, under their own names.
    assert_same_weights(loaded_weights(out), weights(out / "checkpoints" / "step_6"), atol=0)


@pytest.mark.slow
def test_the_vit_forward_compiles_to_one_graph_without_breaks():
    model = ViTForImageClassification(ViTConfig(image_size=32, num_labels=10, **TINY_VIT)).train()
    explanation = torch._dynamo.explain(model)(pixel_values=torch.randn(2, 3, 32, 32))
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
