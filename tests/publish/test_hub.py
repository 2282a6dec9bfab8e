"""The model card of a run's output folder, and its upload to the Hub up to the network boundary."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HTTPError
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from vit_hf.models.conversion import load_npz
from vit_hf.publish import hub
from vit_hf.publish.card import write_model_card
from vit_hf.publish.hub import push_to_hub
from vit_hf.publish.model_dir import save_model_dir
from vit_hf.push import main
from vit_hf.training.run_log import read_run_scalars

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RECIPE = {
    "name": "cifar10-vit-tiny",
    "description": "The tiny official checkpoint on CIFAR-10.",
    "model": {"pretrained": "ViT-B_16", "image_size": 32, "dropout": 0.0, "config": {}},
    "data": {
        "dataset": "cifar10",
        "train_split": "train[:98%]",
        "eval_split": "train[98%:]",
        "test_split": "test",
        "augment": {"crop_scale": [0.05, 1.0], "hflip": True},
        "num_workers": 8,
    },
    "optim": {"name": "sgd", "lr": 0.03, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0, "max_grad_norm": 1.0},
    "schedule": {"name": "cosine", "warmup_steps": 50, "total_steps": 200},
    "train": {
        "global_batch_size": 512,
        "micro_batch_size": 64,
        "eval_batch_size": 128,
        "eval_every": 50,
        "save_every": 100,
        "log_every": 10,
        "seed": 42,
        "mixed_precision": "bf16",
    },
    "output": {"dir": "outputs/cifar10-vit-tiny"},
    "hub": {"push": False, "model_id": None, "private": False},
}
RESULTS = {
    "step": 200,
    "best_step": 150,
    "eval_accuracy": 0.9612,
    "eval_loss": 0.1234,
    "eval_samples": 1000,
    "test_accuracy": 0.9587,
    "test_samples": 10000,
    "train_samples_per_second": 812.5,
    "wall_seconds": 7384.0,
    "images_seen": 102400,
    "num_processes": 2,
    "hardware": "2x NVIDIA H100",
    "mixed_precision": "bf16",
    "base_model": "ViT-B_16",
    "dataset": "uoft-cs/cifar10",
    "class_names": CIFAR10_CLASSES,
}
TRAIN_LOSS = [(step, 2.3 / step**0.5) for step in range(1, 201)]
EVAL_ACCURACY = [(50, 0.5), (100, 0.9), (150, 0.9612), (200, 0.96)]


@pytest.fixture(scope="module")
def finished_run(jax_reference_dir, tmp_path_factory):
    """A fine-tuning run's output folder as the training loop leaves it, from the tiny official checkpoint."""
    out = tmp_path_factory.mktemp("run") / "cifar10-vit-tiny"
    model, _ = load_npz(jax_reference_dir / "tiny_token.npz", labels=CIFAR10_CLASSES)
    save_model_dir(model, out)
    (out / "recipe.json").write_text(json.dumps(RECIPE, indent=2))
    (out / "results.json").write_text(json.dumps(RESULTS, indent=2))
    (out / "checkpoints" / "step_200").mkdir(parents=True)
    (out / "checkpoints" / "step_200" / "model.safetensors").write_bytes(b"optimizer state and all")
    (out / "runs").mkdir()
    train_rows = [{"step": step, "loss": loss, "grad_norm": 1.0, "lr": 0.03} for step, loss in TRAIN_LOSS]
    eval_rows = [{"step": step, "split": "eval", "accuracy": a, "loss": 1 - a} for step, a in EVAL_ACCURACY]
    eval_rows.append({"step": 200, "split": "test", "accuracy": RESULTS["test_accuracy"], "loss": 0.2})
    (out / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in train_rows))
    (out / "eval_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in eval_rows))
    return out


@pytest.fixture
def run_dir(finished_run, tmp_path):
    """A copy of the finished run for one test to write into."""
    return shutil.copytree(finished_run, tmp_path / finished_run.name)


# --- the model card ---------------------------------------------------------------------------------------


def test_card_metadata_round_trips_through_ModelCard(run_dir):
    data = ModelCard.load(write_model_card(run_dir)).data

    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert data.license == "apache-2.0" and data.datasets == ["uoft-cs/cifar10"]
    assert data.base_model is None  # ViT-B_16 is an official .npz, not a Hub model
    assert [(r.dataset_split, r.metric_type, r.metric_value) for r in data.eval_results] == [
        ("test", "accuracy", 0.9587),
        ("train[98%:]", "accuracy", 0.9612),
    ]


def test_card_names_a_hub_base_model_in_the_metadata(run_dir):
    results = {**RESULTS, "base_model": "google/vit-base-patch16-224-in21k"}
    (run_dir / "results.json").write_text(json.dumps(results))

    card = ModelCard.load(write_model_card(run_dir))

    assert card.data.base_model == "google/vit-base-patch16-224-in21k"
    assert "https://huggingface.co/google/vit-base-patch16-224-in21k" in card.text


def test_card_tells_base_checkpoint_data_steps_hardware_and_usage(run_dir):
    text = ModelCard.load(write_model_card(run_dir, model_id="user/tiny-vit")).text

    assert "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz" in text
    assert "| test | `test` | 10,000 | 95.87% |" in text
    assert "| minival | `train[98%:]` | 1,000 | 96.12% | 0.1234 |" in text
    assert "training split `train[:98%]`, minival `train[98%:]`, test `test`" in text
    assert "200 optimizer steps of 512 images: 102,400 training images seen" in text
    assert "2x NVIDIA H100 (2 processes), mixed precision bf16; 2 h 03 min wall time" in text
    assert 'pipeline("image-classification", model="user/tiny-vit")' in text


def test_card_lists_every_field_of_the_recipe(run_dir):
    text = ModelCard.load(write_model_card(run_dir)).text
    rows = [line for line in text.splitlines() if line.startswith("| `")]

    def leaves(section: dict) -> int:
        return sum(leaves(v) if isinstance(v, dict) and v else 1 for v in section.values())

    assert len(rows) == leaves(RECIPE) - 1 == 33  # all but output.dir, a folder of the training machine
    assert not any(row.startswith("| `output.") for row in rows)
    for row in (
        "| `optim.lr` | 0.03 |",
        "| `data.augment.crop_scale` | [0.05, 1.0] |",
        "| `data.augment.hflip` | true |",
        "| `model.config` | {} |",
        "| `schedule.warmup_steps` | 50 |",
        "| `hub.model_id` | null |",
    ):
        assert row in rows


def test_curves_come_from_the_runs_own_logs(run_dir):
    shutil.rmtree(run_dir / "runs")  # the curves need no TensorBoard event files
    scalars = read_run_scalars(run_dir)

    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 201))  # in step order
    assert scalars["train/loss"] == TRAIN_LOSS
    assert scalars["eval/accuracy"] == EVAL_ACCURACY
    assert scalars["test/accuracy"] == [(200, RESULTS["test_accuracy"])]
    assert "![Loss and accuracy against the step](training_curves.png)" in write_model_card(run_dir).read_text()
    with Image.open(run_dir / "training_curves.png") as picture:
        assert picture.format == "PNG" and picture.width > picture.height > 200


def test_read_run_scalars_keeps_what_was_logged_last_for_a_step(tmp_path):
    rows = [{"step": step, "loss": 1.0} for step in range(1, 11)] + [{"step": s, "loss": 2.0} for s in range(6, 13)]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    assert read_run_scalars(tmp_path)["train/loss"] == [(step, 1.0 if step <= 5 else 2.0) for step in range(1, 13)]


def test_a_run_without_scalars_gets_a_card_without_curves(run_dir):
    (run_dir / "train_log.jsonl").unlink()
    (run_dir / "eval_log.jsonl").unlink()

    text = write_model_card(run_dir).read_text()

    assert "The run logged no loss or accuracy." in text and not (run_dir / "training_curves.png").exists()


# --- pushing ----------------------------------------------------------------------------------------------


@pytest.fixture
def hub_calls(monkeypatch):
    """Record what push_to_hub asks of the Hub, instead of asking it."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])  # a temporary folder: what it holds is read now
        kwargs["contents"] = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(hub, "get_token", lambda: "hf_test_token")
    return calls


def test_push_uploads_the_model_card_recipe_results_and_curves_only(run_dir, hub_calls):
    url = push_to_hub(run_dir, "user/tiny-vit", private=True)

    (create, repo_id, create_args), (upload, _, upload_args) = hub_calls
    assert (create, repo_id, create_args) == ("create_repo", "user/tiny-vit", {"private": True, "exist_ok": True})
    assert upload == "upload_folder" and run_dir not in Path(upload_args["folder_path"]).parents
    assert upload_args["commit_message"] == (
        "Upload cifar10-vit-tiny: test accuracy 95.87%, minival accuracy 96.12%, 200 steps"
    )
    uploaded = set(filter_repo_objects(list(upload_args["contents"]), allow_patterns=upload_args["allow_patterns"]))
    assert uploaded == {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "recipe.json",
        "results.json",
        "training_curves.png",
    }
    assert url == "https://huggingface.co/user/tiny-vit/commit/abc"
    assert ModelCard.load(run_dir / "README.md").data.model_name == "user/tiny-vit"


def test_the_card_and_the_uploaded_files_name_no_folder_of_the_training_machine(run_dir, hub_calls, tmp_path):
    machine = tmp_path / "home" / "someone"
    recipe = json.loads((run_dir / "recipe.json").read_text())
    files = {"train": str(machine / "data" / "train.parquet"), "test": [str(machine / "data" / "test-0.parquet")]}
    recipe["data"]["dataset"] = {"path": "parquet", "data_files": files}
    recipe["model"]["pretrained"] = str(machine / "models" / "tiny.npz")
    recipe["output"]["dir"] = str(run_dir)
    (run_dir / "recipe.json").write_text(json.dumps(recipe))
    results = json.loads((run_dir / "results.json").read_text()) | {"base_model": recipe["model"]["pretrained"]}
    (run_dir / "results.json").write_text(json.dumps(results))

    push_to_hub(run_dir, "user/tiny-vit")

    contents = hub_calls[-1][2]["contents"]
    published = json.loads(contents["recipe.json"])
    assert published["data"]["dataset"] == {
        "path": "parquet",
        "data_files": {"train": "train.parquet", "test": ["test-0.parquet"]},
    }
    assert published["model"]["pretrained"] == "tiny.npz" and "output" not in published
    assert json.loads(contents["results.json"])["base_model"] == "tiny.npz"
    card = contents["README.md"].decode()
    assert "| `data.dataset.data_files.train` | train.parquet |" in card and "checkpoint `tiny.npz`" in card
    for name in ("recipe.json", "results.json", "README.md"):
        assert str(tmp_path) not in contents[name].decode(), name
    # The run's own recipe keeps what a resume reads.
    assert json.loads((run_dir / "recipe.json").read_text()) == recipe


def test_push_cli_prints_where_it_pushed(capsys, run_dir, hub_calls):
    main([str(run_dir), "--model-id", "user/tiny-vit"])

    assert capsys.readouterr().out == f"pushed {run_dir} to https://huggingface.co/user/tiny-vit/commit/abc\n"
    assert hub_calls[0][2]["private"] is False


def _push_error(capsys, run_dir, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([str(run_dir), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def test_push_without_a_token_is_a_one_line_error(capsys, run_dir, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)

    assert "no Hugging Face token: set HF_TOKEN" in _push_error(capsys, run_dir, "--model-id", "user/tiny-vit")


def test_push_with_a_malformed_model_id_is_a_one_line_error(capsys, run_dir, hub_calls):
    assert "model id 'user/tiny vit'" in _push_error(capsys, run_dir, "--model-id", "user/tiny vit")
    assert hub_calls == []


def test_push_when_the_hub_cannot_be_reached_is_a_one_line_error(capsys, run_dir, hub_calls, monkeypatch):
    def unreachable(self, repo_id, **kwargs):
        raise HTTPError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)

    err = _push_error(capsys, run_dir, "--model-id", "user/tiny-vit")
    assert err == "error: could not push to the Hub repository user/tiny-vit: [Errno -2] Name or service not known\n"


def test_push_of_a_folder_without_a_model_is_a_one_line_error(capsys, run_dir, hub_calls):
    (run_dir / "model.safetensors").unlink()

    assert "not a model folder (no model.safetensors)" in _push_error(capsys, run_dir, "--model-id", "user/x")
    assert hub_calls == []


def test_push_offline_from_the_shell_prints_one_line_and_exits_2(run_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_real_token"}
    result = subprocess.run(
        [sys.executable, "-m", "vit_hf.push", str(run_dir), "--model-id", "user/tiny-vit"],
        capture_output=True,
        text=True,
        env=env,
    )

    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: could not push to the Hub repository user/tiny-vit: ")
    assert "offline mode is enabled" in result.stderr and result.stderr.count("\n") == 1
