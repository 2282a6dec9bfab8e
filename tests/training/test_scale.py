"""Outgrowing one machine: elastic restarts, resuming on another process count, two machines with node-local
download caches, one download per machine, and the best model of the checkpoint timeline that was resumed."""

import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from launch import free_port, offline_env, run_module
from official_vit import random_params, write_checkpoint
from runs import TINY_VIT, assert_same_weights, losses, tiny_recipe, weights, write_recipe
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification

from vit_hf.publish.model_dir import save_model_dir
from vit_hf.recipe import resolve_recipe
from vit_hf.training import checkpoint
from vit_hf.training.checkpoint import resolve_resume
from vit_hf.training.loop import FineTune, run
from vit_hf.utils.errors import UserError


def run_here(recipe: dict, resume: str | None = None) -> dict:
    """The loop in this process (one process, no TensorBoard): no start-up of its own."""
    return run(resolve_recipe(recipe | {"train": recipe["train"] | {"report_to": []}}), resume=resume)


@contextlib.contextmanager
def launched(command: list[str], log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """COMMAND running with its output in LOG; stopped (SIGTERM: a launcher stops its workers) if still running at
    the end, so that a failed test leaves no processes behind."""
    with open(log, "w") as file:
        process = subprocess.Popen(command, env=env or offline_env(), stdout=file, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=120)


def updates_shown(log: Path) -> int:
    """The last update count of the loop's progress bar (`train: ... | N/TOTAL`) in LOG, 0 before the first."""
    counts = re.findall(r"train:[^|]*\|[^|]*\| (\d+)/\d+", log.read_text(errors="replace"))
    return int(counts[-1]) if counts else 0


def wait_for(condition, process: subprocess.Popen, what: str, seconds: float = 300) -> None:
    """Poll CONDITION while PROCESS runs; fail if it ends first or SECONDS pass (a hung run, not a timing check)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.05)


# --- elastic restarts ------------------------------------------------------------------------------------

# 256 rows, 8 updates an epoch; 120 updates leave the kill time to land while the run goes on.
ELASTIC = {
    "data": {"train_split": "train[:256]", "eval_split": None, "test_split": None},
    "train": {"global_batch_size": 32, "micro_batch_size": 16, "save_every": 5, "log_every": 5, "report_to": []},
    "schedule": {"name": "cosine", "warmup_steps": 2, "total_steps": 120},
}


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_continues_from_the_latest_checkpoint(cifar10_dir, tmp_path):
    unbroken = tmp_path / "unbroken"  # one process, two micro-batches of 16 an update: the same global batches
    run_here(tiny_recipe(cifar10_dir, unbroken, **ELASTIC))

    broken = tmp_path / "broken"
    recipe = write_recipe(tmp_path, tiny_recipe(cifar10_dir, broken, **ELASTIC))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
               "--master-port", str(free_port()), "-m", "vit_hf.finetune", str(recipe)]  # fmt: skip
    with launched(command, tmp_path / "log") as agent:
        wait_for(lambda: list((broken / "checkpoints").glob("step_*")), agent, "checkpoint")
        workers = [p for p in psutil.Process(agent.pid).children(recursive=True) if "vit_hf.finetune" in p.cmdline()]
        assert len(workers) == 2
        workers[1].kill()
        assert agent.wait(timeout=300) == 0
    assert "resumed from" in (tmp_path / "log").read_text()  # the restarted attempt continued by itself
    assert losses(broken) == pytest.approx(losses(unbroken), abs=1e-5)
    assert_same_weights(
        weights(broken / "checkpoints" / "step_120"), weights(unbroken / "checkpoints" / "step_120"), 1e-5
    )


def test_a_restarted_attempt_resumes_the_checkpoints_of_its_job_only(tmp_path, monkeypatch):
    checkpoints = tmp_path / "out" / "checkpoints"
    (checkpoints / "step_4").mkdir(parents=True)
    # Which checkpoints are the job's is the question here, not whether they are whole (test_faults.py checks that).
    monkeypatch.setattr(checkpoint, "checkpoint_damage", lambda path: None)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert resolve_resume(checkpoints, None) == checkpoints / "step_4"  # written after this process's parent began
    os.utime(checkpoints / "step_4", (0, 0))  # another run's, from before this job
    with pytest.raises(UserError, match="already holds checkpoints"):
        resolve_resume(checkpoints, None)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(UserError, match="already holds checkpoints"):
        resolve_resume(checkpoints, None)


# --- a signal to one process stops all of them after the same update -------------------------------------

# 256 rows, 8 micro-batches of 16 an epoch on 2 processes; no log, minival or checkpoint of its own before step 1000.
SIGNALLED = {
    "data": {"train_split": "train[:256]", "eval_split": None, "test_split": None},
    "train": {"global_batch_size": 32, "micro_batch_size": 16, "save_every": 1000, "log_every": 1000, "report_to": []},
    "schedule": {"name": "cosine", "warmup_steps": 2, "total_steps": 2000},
}


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_one_checkpoint_at_the_next_update_that_resumes_exactly(
    cifar10_dir, tmp_path
):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_recipe(cifar10_dir, out, **SIGNALLED))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "vit_hf.finetune", str(recipe)]  # fmt: skip
    with launched(command, tmp_path / "log") as agent:
        # A few updates (the progress bar's count), far from any log, minival or checkpoint step: few enough that the
        # float rounding of 2 processes against 1 stays within the tolerance below, whatever the machine's speed.
        wait_for(lambda: updates_shown(tmp_path / "log") >= 3, agent, "3 updates")
        workers = [p for p in psutil.Process(agent.pid).children(recursive=True) if "vit_hf.finetune" in p.cmdline()]
        assert len(workers) == 2
        workers[1].terminate()  # SIGTERM to the second process only
        assert agent.wait(timeout=300) != 0
    log = (tmp_path / "log").read_text()
    # The first to exit (128 + SIGTERM) ends the job: the launcher stops the other if it is not gone yet, and raises
    # its own ChildFailedError; no traceback passes through this project's code.
    assert re.search(r"exitcode\s*: 143", log) and not re.search(r'File ".*vit_hf', log), log[-3000:]
    saved = sorted(out.glob("checkpoints/step_*"))
    assert len(saved) == 1, log[-3000:]
    step = int(saved[0].name.removeprefix("step_"))
    assert 0 < step < 1000 and f"stopped at step {step}" in log
    assert sorted(p.name for p in saved[0].glob("augment_rng_*.pt")) == ["augment_rng_0.pt", "augment_rng_1.pt"]

    # Both processes stopped after the same update: the checkpoint holds the weights of `step` updates, those of
    # the same updates in one process (the same global batches).
    job = FineTune(resolve_recipe(tiny_recipe(cifar10_dir, tmp_path / "one", **SIGNALLED)))
    job.bar = tqdm(disable=True)  # set by `train`, which `update` assumes has started
    job.model.train()
    for _ in range(step):
        job.update()
    assert_same_weights(job.accelerator.unwrap_model(job.model).state_dict(), weights(saved[0]), 1e-5)


def test_bad_input_met_by_both_processes_is_reported_once(cifar10_dir, tmp_path):
    sections = {"data": {"train_split": "nosuch[:10]"}, "train": {"micro_batch_size": 16}}
    result = run_module(
        "vit_hf.finetune", [str(write_recipe(tmp_path, tiny_recipe(cifar10_dir, tmp_path, **sections)))], 2
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "nosuch" in errors[0], result.stderr[-3000:]
    assert not re.search(r'File ".*vit_hf', result.stderr)  # the launcher's own traceback only


# --- resuming on another process count -------------------------------------------------------------------

# 168 rows in micro-batches of 16 (drop_last): 160 samples an epoch on 1 or 2 processes; an update is 64 of them, so
# the checkpoint after update 3 lies 32 samples into epoch 1: 2 micro-batches of 1 process, 1 of each of 2.
RESCALE = {
    "data": {"train_split": "train[:168]", "eval_split": None, "test_split": None},
    "train": {
        "global_batch_size": 64,
        "micro_batch_size": 16,
        "save_every": 3,
        "keep_checkpoints": 5,
        "log_every": 1,
        "report_to": [],
    },
    "schedule": {"name": "cosine", "warmup_steps": 2, "total_steps": 9},
}


@pytest.fixture(scope="module")
def two_process_run(cifar10_dir, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("two")
    out = tmp_path / "out"
    result = run_module("vit_hf.finetune", [str(write_recipe(tmp_path, tiny_recipe(cifar10_dir, out, **RESCALE)))], 2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def copy_checkpoint(run_dir: Path, step: int, into: Path) -> None:
    shutil.copytree(run_dir / "checkpoints" / f"step_{step}", into / "checkpoints" / f"step_{step}")


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process_to_the_unbroken_weights(
    two_process_run, cifar10_dir, tmp_path
):
    progress = torch.load(two_process_run / "checkpoints" / "step_3" / "custom_checkpoint_0.pkl", weights_only=True)
    assert (progress["epoch"], progress["samples_in_epoch"]) == (1, 32)
    resumed = tmp_path / "resumed"
    copy_checkpoint(two_process_run, 3, resumed)
    results = run_here(tiny_recipe(cifar10_dir, resumed, **RESCALE), resume="auto")
    assert results["num_processes"] == 1 and results["accumulation_steps"] == 4
    assert losses(resumed) == pytest.approx(losses(two_process_run)[3:], abs=1e-5)
    assert_same_weights(
        weights(resumed / "checkpoints" / "step_9"), weights(two_process_run / "checkpoints" / "step_9"), 1e-5
    )


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_processes_to_the_unbroken_weights(cifar10_dir, tmp_path):
    unbroken = tmp_path / "unbroken"
    run_here(tiny_recipe(cifar10_dir, unbroken, **RESCALE))
    resumed = tmp_path / "resumed"
    copy_checkpoint(unbroken, 3, resumed)
    recipe = write_recipe(tmp_path, tiny_recipe(cifar10_dir, resumed, **RESCALE))
    result = run_module("vit_hf.finetune", [str(recipe), "--resume", "auto"], processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 3" in result.stdout + result.stderr
    assert losses(resumed) == pytest.approx(losses(unbroken)[3:], abs=1e-5)
    assert_same_weights(weights(resumed / "checkpoints" / "step_9"), weights(unbroken / "checkpoints" / "step_9"), 1e-5)


@pytest.mark.slow
def test_an_older_checkpoint_without_a_global_position_resumes_on_its_own_process_count(cifar10_dir, tmp_path):
    unbroken = tmp_path / "unbroken"
    run_here(tiny_recipe(cifar10_dir, unbroken, **RESCALE))
    resumed = tmp_path / "resumed"
    copy_checkpoint(unbroken, 3, resumed)
    progress_file = resumed / "checkpoints" / "step_3" / "custom_checkpoint_0.pkl"
    progress = torch.load(progress_file, weights_only=True)
    torch.save({k: v for k, v in progress.items() if k not in ("samples_in_epoch", "epoch_samples")}, progress_file)
    (progress_file.parent / "manifest.json").unlink()  # such checkpoints predate the manifest too
    run_here(tiny_recipe(cifar10_dir, resumed, **RESCALE), resume="auto")
    assert_same_weights(weights(resumed / "checkpoints" / "step_9"), weights(unbroken / "checkpoints" / "step_9"), 1e-6)


@pytest.mark.slow
def test_resuming_with_augmentation_on_another_process_count_is_refused_in_one_line(
    two_process_run, cifar10_dir, tmp_path
):
    resumed = tmp_path / "resumed"
    copy_checkpoint(two_process_run, 3, resumed)
    sections = RESCALE | {"data": RESCALE["data"] | {"augment": {"crop_scale": [0.3, 1.0]}}}
    with pytest.raises(UserError) as refused:  # the command line prints it as one line (vit_hf.errors.cli_entry)
        run_here(tiny_recipe(cifar10_dir, resumed, **sections), resume="auto")
    assert str(refused.value) == (
        f"--resume {resumed / 'checkpoints' / 'step_3'}: written by 2 processes, resumed on 1 process: "
        "data.augment draws random numbers on each process: resume it on 2 processes"
    )
    assert not (resumed / "checkpoints" / "step_6").exists()


@pytest.mark.slow
def test_an_epoch_of_another_length_is_refused(two_process_run, cifar10_dir, tmp_path):
    resumed = tmp_path / "resumed"
    copy_checkpoint(two_process_run, 3, resumed)
    sections = RESCALE | {"train": RESCALE["train"] | {"micro_batch_size": 64}}  # 2 whole micro-batches: 128 samples
    with pytest.raises(UserError, match="written by 2 processes, resumed on 1 process: an epoch is 160 samples there"):
        run_here(tiny_recipe(cifar10_dir, resumed, **sections), resume="auto")


# --- several machines, one download each ---------------------------------------------------------------


class _Server(http.server.BaseHTTPRequestHandler):
    """Serves `body` at any path, counting requests; the first response waits for `release` halfway."""

    body = b""
    requests: list[str | None] = []
    started = threading.Event()
    release = threading.Event()

    def do_GET(self):  # noqa: N802 (the http.server API)
        self.requests.append(self.headers.get("Range"))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        half = len(self.body) // 2
        self.wfile.write(self.body[:half])
        self.wfile.flush()
        self.started.set()
        self.release.wait(timeout=120)
        self.wfile.write(self.body[half:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A local stand-in for the checkpoint bucket, serving a tiny official-layout checkpoint."""
    params = random_params(layers=2, hidden=32, heads=2, mlp=64, patch=8, grid=4, representation=None, classes=None)
    npz = write_checkpoint(tmp_path / "tiny.npz", params)
    _Server.body, _Server.requests = npz.read_bytes(), []
    _Server.started, _Server.release = threading.Event(), threading.Event()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/vit_models/tiny.npz", npz, _Server
    _Server.release.set()
    httpd.shutdown()


DOWNLOAD = """import sys
from pathlib import Path
from vit_hf.models.download import download
print("downloading", flush=True)
download(sys.argv[1], Path(sys.argv[2]))
"""


def test_two_processes_downloading_one_file_into_one_cache_fetch_it_once(server, tmp_path):
    url, npz, handler = server
    cache = tmp_path / "cache"
    command = [sys.executable, "-c", DOWNLOAD, url, str(cache)]
    first = subprocess.Popen(command, env=offline_env(), stdout=subprocess.DEVNULL)
    assert handler.started.wait(timeout=120)  # the first holds the lock, halfway through the file
    second = subprocess.Popen(command, env=offline_env(), stdout=subprocess.PIPE, text=True)
    assert second.stdout.readline() == "downloading\n"
    time.sleep(1)  # time for the second to reach the lock: without one it would send a request of its own now
    handler.release.set()
    assert first.wait(timeout=120) == 0 and second.wait(timeout=120) == 0
    assert handler.requests == [None]  # one request, for the whole file
    files = [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert [p.name for p in files] == ["tiny.npz"] and files[0].read_bytes() == npz.read_bytes()


@pytest.mark.slow
def test_two_machines_with_their_own_download_cache_reach_the_weights_of_one_process(server, cifar10_dir, tmp_path):
    url, npz, handler = server
    handler.release.set()
    sections = {
        "model": {"pretrained": url, "image_size": 32, "config": {}},
        "data": {"train_split": "train[:256]", "eval_split": None, "test_split": None},
        "train": {"global_batch_size": 32, "micro_batch_size": 16, "log_every": 1, "report_to": []},
    }
    one = tmp_path / "one"
    run_here(tiny_recipe(cifar10_dir, one, **sections) | {"model": sections["model"] | {"pretrained": str(npz)}})

    shared = tmp_path / "shared"  # output.dir on a file system both machines see
    recipe = write_recipe(tmp_path, tiny_recipe(cifar10_dir, shared, **sections))
    port = free_port()
    with contextlib.ExitStack() as stack:
        machines = []
        for rank in (0, 1):
            command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                       "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                       "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                       "-m", "vit_hf.finetune", str(recipe)]  # fmt: skip
            env = offline_env() | {"VIT_HF_CACHE": str(tmp_path / f"machine{rank}_cache")}
            machines.append(stack.enter_context(launched(command, tmp_path / f"machine{rank}.log", env)))
        for rank, machine in enumerate(machines):
            assert machine.wait(timeout=300) == 0, (tmp_path / f"machine{rank}.log").read_text()[-3000:]
    assert json.loads((shared / "results.json").read_text())["num_processes"] == 2
    assert handler.requests == [None, None]  # one download on each machine
    for rank in (0, 1):
        assert len(list((tmp_path / f"machine{rank}_cache").rglob("tiny.npz"))) == 1
    assert losses(shared) == pytest.approx(losses(one), abs=1e-5)
    assert_same_weights(weights(shared / "checkpoints" / "step_6"), weights(one / "checkpoints" / "step_6"), 1e-5)


# --- the best model follows the checkpoint resumed -------------------------------------------------------


@pytest.mark.slow
def test_a_resume_exports_the_best_model_of_the_timeline_it_continues(cifar10_dir, tmp_path):
    # A high learning rate and minival after every update: its accuracy goes up and down.
    sections = {
        "data": {"test_split": None},
        "optim": {"name": "adamw", "lr": 0.03},
        "schedule": {"name": "cosine", "warmup_steps": 1, "total_steps": 8},
        "train": {"eval_every": 1, "save_every": 1, "keep_checkpoints": 10, "log_every": 4, "report_to": []},
    }
    unbroken = tmp_path / "unbroken"
    best_step = run_here(tiny_recipe(cifar10_dir, unbroken, **sections))["best_step"]
    assert best_step < 8, "minival is best at the last step: pick a recipe where it is not"

    # Resumed from the best step: no later minival beats it, so the export is the best model as of that checkpoint,
    # not the one a continuation (abandoned by this resume) left in checkpoints/best.
    resumed = tmp_path / "resumed"
    copy_checkpoint(unbroken, best_step, resumed)
    config = ViTConfig(image_size=32, num_labels=10, **TINY_VIT)
    save_model_dir(ViTForImageClassification(config), resumed / "checkpoints" / "best")
    results = run_here(tiny_recipe(cifar10_dir, resumed, **sections), resume="auto")
    assert results["best_step"] == best_step
    assert_same_weights(weights(resumed), weights(unbroken), atol=0)
    assert_same_weights(weights(resumed / "checkpoints" / f"step_{best_step}" / "best"), weights(unbroken), atol=0)
