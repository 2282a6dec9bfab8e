"""The offline first run: recipes/quickstart_local.json on local files named with one --set, as the README shows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch import offline_env
from photos import write_photo_folder

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart_local.json"
# Only the size shrinks: the recipe's own model, optimizer, schedule shape and augmentation stay.
SMALLER = ["schedule.total_steps=4", "schedule.warmup_steps=1", "train.global_batch_size=8",
           "train.micro_batch_size=8", "train.eval_every=2", "train.save_every=2", "data.num_workers=0"]  # fmt: skip


def command(module: str, folder: Path, *args: str) -> subprocess.CompletedProcess:
    sets = [f"--set=data.dataset.path={folder}"]
    return subprocess.run([sys.executable, "-m", module, str(QUICKSTART), *sets, *args], capture_output=True,
                          text=True, env=offline_env(), timeout=300)  # fmt: skip


def test_the_preview_of_the_quickstart_reads_a_folder_of_cifar_parquet_files(cifar10_dir, tmp_path):
    result = command("vit_hf.preview", cifar10_dir, "--out", str(tmp_path / "augmented.png"), "--count", "8")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "augmented.png").stat().st_size > 0


@pytest.mark.slow
def test_the_quickstart_trains_on_a_photo_folder_with_one_set(cifar10_dir, tmp_path):
    folder = write_photo_folder(tmp_path / "photos", cifar10_dir, broken=False)
    out = tmp_path / "out"
    # 16 photos: a 5% minival would be one photo, which the run refuses (it must hold every class).
    splits = ["data.train_split=train[:70%]", "data.eval_split=train[70%:]"]
    sets = [f"--set={assignment}" for assignment in [*SMALLER, *splits, f"output.dir={out}"]]
    result = command("vit_hf.finetune", folder / "train", *sets)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 4 and results["eval_samples"] > 0
    assert sorted(json.loads((out / "config.json").read_text())["label2id"]) == ["cat", "dog", "ship"]
