"""`train.report_to`: the run's own logs draw the curves with any trackers, or none; bad names are refused."""

import json

import pytest
from launch import one_line_error
from runs import finetune, losses, tiny_recipe, train_rows, write_recipe
from transformers import ViTForImageClassification

from vit_hf.finetune import main as finetune_main
from vit_hf.publish.card import CURVES


def tracked_recipe(cifar10_dir, out, report_to: list[str]) -> dict:
    return tiny_recipe(cifar10_dir, out, train={"report_to": report_to})


@pytest.mark.slow
def test_no_tracker_still_draws_the_curves_and_writes_the_card(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    result = finetune(write_recipe(tmp_path, tracked_recipe(cifar10_dir, out, [])))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in train_rows(out)] == list(range(1, 7))
    assert (out / CURVES).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    card = (out / "README.md").read_text()
    assert f"![Loss and accuracy against the step]({CURVES})" in card
    results = json.loads((out / "results.json").read_text())
    exported = sum(p.numel() for p in ViTForImageClassification.from_pretrained(out).parameters())
    assert results["trainable_parameters"] == results["total_parameters"] == exported  # no LoRA: every weight trains
    assert f"{results['total_parameters']:,} of {results['total_parameters']:,} parameters trained (100.00%)" in card
    assert results["step"] == 6
    assert not (out / "runs").exists()  # no tracker wrote anything


@pytest.mark.slow  # a process of its own: seconds of imports
def test_an_unknown_tracker_is_one_line_naming_train_report_to(tmp_path, capsys):
    # In this process: test_finetune's bad-recipe test runs the command line in a process of its own.
    recipe = write_recipe(tmp_path, {"train": {"report_to": ["tensorbord"]}, "output": {"dir": str(tmp_path / "o")}})
    line = one_line_error(finetune_main, [str(recipe)], capsys)
    assert line.startswith(f'error: {recipe}: train.report_to: "tensorbord" is not a tracker')
    assert "tensorboard" in line  # the names it could have been
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_mlflow_logs_offline_to_a_local_store(cifar10_dir, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    out, store = tmp_path / "out", (tmp_path / "mlruns").as_uri()
    # A local file store, for the run and for this reader: no server, no network (MLflow 3 asks for the opt-in to its
    # file backend).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    result = finetune(write_recipe(tmp_path, tracked_recipe(cifar10_dir, out, ["mlflow"])))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / CURVES).is_file() and (out / "README.md").is_file()

    client = mlflow.MlflowClient(store)
    [experiment] = [e for e in client.search_experiments() if e.name == "runs"]  # accelerator.init_trackers("runs")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert [step for step, _ in logged] == list(range(1, 7))
    assert [value for _, value in logged] == pytest.approx(losses(out), rel=1e-6)
    evals = [json.loads(line) for line in (out / "eval_log.jsonl").read_text().splitlines()]
    accuracy = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert sorted(m.step for m in accuracy) == [row["step"] for row in evals if row["split"] == "eval"]
