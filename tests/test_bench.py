"""The benchmarks in benchmarks/: the FLOP count, the GPU peaks, smoke runs of the real scripts on a tiny ViT, and the
commands of the GPU check."""

import argparse
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
from bench_loop import MODELS, bench_recipe, peak_tflops, training_flops_per_image
from transformers import ViTConfig

REPO = Path(__file__).resolve().parents[1]


def test_a_vit_b16_training_step_at_224_px_is_about_105_gflops_an_image():
    config = ViTConfig(image_size=224, **MODELS["ViT-B_16"])
    assert training_flops_per_image(config) == pytest.approx(105e9, rel=0.01)


@pytest.mark.parametrize(
    "device, peak",
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("CPU", None)],
)
def test_peaks_are_found_by_device_name(device, peak):
    assert peak_tflops(device) == peak


@pytest.mark.parametrize(
    "flags, momentum_dtype, checkpointing",
    [({}, "float32", False), ({"momentum_dtype": "bfloat16", "gradient_checkpointing": True}, "bfloat16", True)],
)
def test_memory_flags_set_the_momentum_dtype_and_gradient_checkpointing_of_the_recipe(
    flags, momentum_dtype, checkpointing
):
    args = argparse.Namespace(
        recipe=None, set=[], model="tiny", layers=None, image_size=None, micro_batch=None, precision=None,
        compile=False, momentum_dtype=None, gradient_checkpointing=False, warmup=10, steps=30,
    )  # fmt: skip
    recipe = bench_recipe(argparse.Namespace(**vars(args) | flags))
    assert recipe["optim"]["momentum_dtype"] == momentum_dtype
    assert recipe["train"]["gradient_checkpointing"] is checkpointing


@pytest.mark.slow
def test_bench_prints_a_json_line_a_case_then_a_table_with_the_ratio(cifar10_dir, capsys, monkeypatch):
    from bench_loop import main

    dataset = {"path": "parquet", "data_files": {"train": str(cifar10_dir / "train.parquet")}}
    argv = [
        "--model", "tiny", "--layers", "1", "--image-size", "32", "--micro-batch", "8", "--precision", "no",
        "--warmup", "1", "--steps", "2", "--compare-trainer", "--set", f"data.dataset={json.dumps(dataset)}",
        "--set", "data.num_workers=0", "--set", "train.log_every=1", "--momentum-dtype", "bfloat16",
        "--gradient-checkpointing",
    ]  # fmt: skip
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each case runs in a process of its own, which reads it
    main(argv)

    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines[:2]]
    assert [row["case"] for row in rows] == ["vit_hf.finetune", "transformers.Trainer"]
    for row in rows:
        assert row["images_per_second"] > 0 and row["input_images_per_second"] > 0 and row["peak_memory_gib"] > 0
        assert row["mfu"] is None  # a CPU has no known peak
        assert (row["model"]["num_hidden_layers"], row["image_size"], row["micro_batch"]) == (1, 32, 8)
        assert (row["momentum_dtype"], row["gradient_checkpointing"]) == ("bfloat16", True)
    table = lines[lines.index("| case | train images/s | MFU | input images/s | peak memory GiB |") :]
    assert [line.split(" | ")[0] for line in table[2:4]] == ["| vit_hf.finetune", "| transformers.Trainer"]
    assert table[-1].startswith("vit_hf.finetune / transformers.Trainer: ") and table[-1].endswith("x")


def test_input_pipeline_bench_prints_both_pipelines_and_the_ratio(cifar10_dir, capsys):
    from bench_data import main

    dataset = {"path": "parquet", "data_files": {"train": str(cifar10_dir / "train.parquet")}}
    args = ["--dataset", json.dumps(dataset), "--image-size", "64", "--batch-size", "16"]
    main([*args, "--num-workers", "0", "--warmup", "1", "--batches", "2"])
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines[:2]]
    assert [row["ratio"] for row in rows][0] == 1.0 and rows[1]["images_per_second"] > 0
    ratio = rows[1]["images_per_second"] / rows[0]["images_per_second"]
    assert rows[1]["ratio"] == pytest.approx(ratio, rel=0.01, abs=0.0005)  # printed with 3 decimals
    assert "| pipeline | images/s | per worker | ratio |" in lines


@pytest.mark.parametrize("decoder", ["region", "pillow"])
def test_input_pipeline_bench_times_photos_made_from_the_data_set_with_either_jpeg_decoder(
    cifar10_dir, capsys, monkeypatch, decoder
):
    from bench_data import main

    from vit_hf.data import photos as data_module

    if data_module._jpeg is None:
        pytest.skip("vit_hf._jpeg is not built (no C compiler or libjpeg-turbo headers at install)")
    calls = []

    def decode_region(*args):
        calls.append(args[2:])
        return real.decode_region(*args)

    real = data_module._jpeg
    monkeypatch.setattr(data_module, "_jpeg", type("Spy", (), {"decode_region": staticmethod(decode_region)}))
    # Recorded, so that what main sets is undone after the test (delenv records nothing where the variable is unset).
    monkeypatch.setenv(data_module.JPEG_DECODER_VARIABLE, "region")
    dataset = {"path": "parquet", "data_files": {"train": str(cifar10_dir / "train.parquet")}}
    photos = ["--make-photos", "24", "--photo-sides", "60", "90", "--jpeg-decoder", decoder]
    timing = ["--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--warmup", "1", "--batches", "2"]
    main(["--dataset", json.dumps(dataset), *photos, *timing])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()[:2]]
    assert [row["jpeg_decoder"] for row in rows] == [decoder, decoder]
    assert rows[0]["images"].startswith("24 JPEGs of 60-90 px made from")
    # Ours decodes each photo's crop region (3 batches of 8), or never where Pillow is asked for.
    assert len(calls) == (24 if decoder == "region" else 0)
    assert (os.environ.get(data_module.JPEG_DECODER_VARIABLE) == "pillow") == (decoder == "pillow")  # for workers


@pytest.mark.slow
def test_whole_process_mode_times_our_process_and_the_trainers_on_the_same_model(capsys):
    from bench_loop import main

    argv = [
        "--whole-process", "--model", "tiny", "--layers", "1", "--image-size", "32", "--micro-batch", "8",
        "--precision", "no", "--steps", "2", "--repeats", "1", "--random-images", "64",
        "--set", "data.num_workers=0", "--set", "train.log_every=1", "--set", "train.report_to=[]",
    ]  # fmt: skip
    rows = main(argv)

    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines[:2]] == rows
    assert [row["case"] for row in rows] == ["vit_hf.finetune", "transformers.Trainer"]
    for row in rows:
        assert row["wall_seconds"] > row["startup_seconds"] > 0 and row["train_seconds"] > 0
        assert row["finish_seconds"] > 0 and row["test_accuracy"] is not None
        assert (row["shape"]["num_hidden_layers"], row["shape"]["image_size"], row["shape"]["num_labels"]) == (
            1,
            32,
            10,
        )
    table = lines[lines.index("| case | wall s (each run) | wall s | startup s | train s | finish s | other s |") :]
    assert [line.split(" | ")[0] for line in table[2:4]] == ["| vit_hf.finetune", "| transformers.Trainer"]
    assert table[-1].startswith("transformers.Trainer / vit_hf.finetune wall time") and table[-1].endswith("x")


def test_whole_process_mode_refuses_a_warm_up_and_a_pretrained_model(capsys):
    from bench_loop import main, whole_process_recipe

    from vit_hf.utils.errors import UserError

    with pytest.raises(SystemExit) as exit:
        main(["--whole-process", "--warmup", "5"])
    assert exit.value.code == 2 and "no --warmup" in capsys.readouterr().err
    args = argparse.Namespace(
        recipe=None, set=["model.pretrained=ViT-B_16"], model=None, layers=None, image_size=None, micro_batch=None,
        precision=None, compile=False, momentum_dtype=None, gradient_checkpointing=False, steps=20,
    )  # fmt: skip
    dataset = {"path": "parquet", "data_files": {"train": "train.parquet"}}
    with pytest.raises(UserError, match="from-scratch"):
        whole_process_recipe(args, dataset, has_test=False)


def test_whole_process_mode_starts_the_trainer_script_by_its_path():
    from bench_loop import TRAINER, WHOLE

    _, command, _ = WHOLE[TRAINER]
    assert command == [str(REPO / "benchmarks" / "trainer_baseline.py")] and Path(command[0]).is_file()


def test_the_gpu_check_runs_scripts_modules_files_and_names_that_exist():
    # It runs only where a GPU is lent: what it names is checked here, where modules move.
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    scripts = re.findall(r"\bpython3? (benchmarks/\w+\.py)", script)
    modules = re.findall(r"(?<![\w-])-m (vit_hf(?:\.\w+)+)", script)
    files = re.findall(r"\b((?:recipes|accelerate_configs)/[\w.]+\w)", script)
    imports = re.findall(r"^from (vit_hf[\w.]*) import (.+)$", script, re.MULTILINE)
    assert scripts and modules and files and imports
    missing = [path for path in scripts + files if not (REPO / path).is_file()]
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        missing += [] if found else [module]
    for module, names in imports:
        loaded = importlib.import_module(module)
        missing += [f"{module}.{name.strip()}" for name in names.split(",") if not hasattr(loaded, name.strip())]
    assert missing == []
