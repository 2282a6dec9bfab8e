"""Faults a long run meets (#27), in real processes with real signals and a real full disk: kills at any moment, a
full disk, a damaged checkpoint, a folder in use; and torn logs and pickled calls in a checkpoint (#24 items 7, 8).

One recipe throughout: 12 updates, a checkpoint every 2 and an evaluation every 3, EMA on (a second custom state in
every checkpoint). The runs pause at named moments (vit_hf.utils.fault_points, inert outside tests), where a test
kills them or fills their disk.
"""

import base64
import errno
import http.server
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from launch import free_port, in_ci, offline_env
from runs import finetune, run_here, tiny_recipe, train_rows, weights, write_recipe

from vit_hf.training.checkpoint_files import checkpoint_damage, write_manifest
from vit_hf.training.run_log import read_rows
from vit_hf.utils.errors import UserError
from vit_hf.utils.files import clear_leftovers

SECTIONS = {
    "schedule": {"name": "cosine", "warmup_steps": 2, "total_steps": 12},
    "train": {"save_every": 2, "eval_every": 3, "log_every": 1, "ema_decay": 0.9, "report_to": []},
    "data": {"eval_split": "train[2000:2100]", "test_split": "test[:100]"},
}
# The moments of a run by phase, by the name of their fault point (the key without its "@step").
PHASES = {
    "update": ("update", "logged"),
    "checkpoint": ("save", "saved state", "write manifest.json", "replace manifest.json", "renamed"),
    "evaluation": ("logged eval", "logged eval_ema", "write best", "replace best"),
    "export": ("logged eval_exported", "logged test", "replace files", "write results.json", "write README.md"),
}


def recipe_for(cifar10_dir: Path, tmp_path: Path, out: Path, name: str = "recipe.json") -> Path:
    return write_recipe(tmp_path, tiny_recipe(cifar10_dir, out, **SECTIONS), name)


def start(recipe: Path, *args: str, pause_at: str | None = None, marker: Path | None = None) -> subprocess.Popen:
    """`python -m vit_hf.finetune RECIPE ARGS` in the background, pausing at the moment PAUSE_AT (creating MARKER);
    its output goes to files beside MARKER (a pipe nobody reads could fill and stall it)."""
    env = offline_env() | ({"VIT_HF_FAULT_POINT": pause_at, "VIT_HF_FAULT_FILE": str(marker)} if pause_at else {})
    logs = (marker or recipe).with_suffix(".log")
    with open(logs, "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "vit_hf.finetune", str(recipe), *args], env=env, stdout=log, stderr=log
        )


def wait_paused(process: subprocess.Popen, marker: Path) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run never paused: {marker.with_suffix('.log').read_text()[-3000:]}")
        time.sleep(0.02)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def leftovers(out: Path) -> list[str]:
    """Temporary files and folders under OUT: the atomic writers' and a checkpoint's staging."""
    return [str(p) for p in out.rglob("*") if ".tmp" in p.name or ".old-" in p.name or p.name.startswith(".push-")]


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[key].double() - b[key].double()).abs().max()) for key in a)


def assert_unbroken(out: Path, unbroken: Path) -> float:
    """OUT finished as the unbroken run did: each update and evaluation logged once with its figures, the same
    weights, average and exported model; no temporaries left. Returns the largest weight difference."""
    rows, expected = train_rows(out), train_rows(unbroken)
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert [row["loss"] for row in rows] == pytest.approx([row["loss"] for row in expected], abs=1e-6)
    evals, expected_evals = read_rows(out / "eval_log.jsonl"), read_rows(unbroken / "eval_log.jsonl")
    assert [(row["step"], row["split"]) for row in evals] == [(row["step"], row["split"]) for row in expected_evals]
    assert [row["accuracy"] for row in evals] == [row["accuracy"] for row in expected_evals]
    assert [row["loss"] for row in evals] == pytest.approx([row["loss"] for row in expected_evals], abs=1e-6)
    last, reference = out / "checkpoints" / "step_12", unbroken / "checkpoints" / "step_12"
    averages = [torch.load(c / "custom_checkpoint_1.pkl", weights_only=True)["weights"] for c in (last, reference)]
    difference = max(
        max_difference(weights(last), weights(reference)),
        max_difference(*averages),
        max_difference(weights(out), weights(unbroken)),
    )
    assert difference <= 1e-6
    assert json.loads((out / "results.json").read_text())["step"] == 12
    assert leftovers(out) == []
    return difference


@pytest.fixture(scope="module")
def unbroken(cifar10_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """The run no fault touches, and the moments it passed, in order."""
    tmp_path = tmp_path_factory.mktemp("unbroken")
    out, trace = tmp_path / "out", tmp_path / "trace"
    env = {"VIT_HF_FAULT_POINT": "trace", "VIT_HF_FAULT_FILE": str(trace)}
    process = subprocess.run(
        [sys.executable, "-m", "vit_hf.finetune", str(recipe_for(cifar10_dir, tmp_path, out))],
        env=offline_env() | env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    return out, trace.read_text().splitlines()


# --- kills at any moment -----------------------------------------------------------------------------------


def kill_moments(trace: list[str], seed: int) -> list[str]:
    """Seven moments drawn with SEED, in the order the run passes them: two in updates (the first before the first
    checkpoint is complete), two in checkpoint writes, two in evaluations, and one in the export."""
    first = {key: trace.index(key) for key in dict.fromkeys(trace)}
    by_phase = {phase: [k for k in first if k.split("@")[0] in names] for phase, names in PHASES.items()}
    complete = first["renamed@2"]
    draw = random.Random(seed)
    chosen = [draw.choice([k for k in by_phase["update"] if first[k] < complete])]
    chosen += draw.sample([k for k in by_phase["update"] if first[k] > complete], 1)
    for phase in ("checkpoint", "evaluation"):
        chosen += draw.sample(by_phase[phase], 2)
    chosen += [draw.choice(by_phase["export"])]
    return sorted(chosen, key=first.get)


@pytest.mark.slow
def test_sigkill_at_seven_seeded_moments_then_resume_auto_gives_the_unbroken_run(unbroken, cifar10_dir, tmp_path):
    reference, trace = unbroken
    moments = kill_moments(trace, seed=27)
    print("kill moments:", moments)
    out = tmp_path / "out"
    recipe = recipe_for(cifar10_dir, tmp_path, out)
    args: tuple[str, ...] = ()
    for number, moment in enumerate(moments):
        marker = tmp_path / f"kill{number}"
        process = start(recipe, *args, pause_at=moment, marker=marker)
        wait_paused(process, marker)
        kill(process)
        # The lock file names the dead run; the kernel released its lock.
        assert (out / "run.lock").read_text().split()[0] == str(process.pid)
        args = ("--resume", "auto")
    result = finetune(recipe, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    first_resume = (tmp_path / "kill1.log").read_text()
    assert "resumed from" not in first_resume  # the first kill came before any checkpoint: it started afresh
    print("max weight difference after 7 kills:", assert_unbroken(out, reference))


# --- a full disk -------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A factory of real tmpfs file systems of a given size, unmounted after the test (root only)."""
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if done.returncode != 0:
            reason = f"cannot mount a tmpfs (needs root): {done.stderr.strip() or done.returncode}"
            pytest.fail(reason) if in_ci() else pytest.skip(reason)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def fill(disk: Path) -> None:
    """Write zeros on DISK until it has no byte left."""
    with open(disk / "filler", "wb", buffering=0) as file:
        try:
            while True:
                file.write(bytes(4096))
        except OSError as error:
            assert error.errno == errno.ENOSPC


def page_bytes(folder: Path) -> int:
    """The space FOLDER's files take on a tmpfs (whole 4 KB pages), a file with several links once."""
    inodes = {p.stat().st_ino: p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    return sum(-(-size // 4096) * 4096 for size in inodes.values())


def half_run_disk(reference: Path, small_disk) -> Path:
    """A tmpfs with room for two checkpoints and two best models of REFERENCE's run, its logs and some slack: the
    same run fills it about halfway."""
    return small_disk(2 * page_bytes(reference / "checkpoints" / "step_10") + 128 * 1024)


def saved_steps(out: Path) -> list[int]:
    return [int(p.name[5:]) for p in (out / "checkpoints").glob("step_*")]


def accelerate_quiet_two_processes() -> list[str]:
    """`accelerate launch -q` of vit_hf.finetune on two gloo processes (the CPU config), on a free port."""
    cpu_config = Path(__file__).resolve().parents[2] / "accelerate_configs" / "cpu.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", str(cpu_config),
            "--main_process_port", str(free_port()), "-m", "vit_hf.finetune"]  # fmt: skip


def assert_stopped_for_space(result: subprocess.CompletedProcess, out: Path, processes: int = 1) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_error_line(result)
    assert line.startswith("error: the disk is full: writing in ") and str(out) in line, line
    assert "needs" in line
    latest = max((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]), default=None)
    if latest is not None:
        assert checkpoint_damage(latest) is None and str(latest) in line  # the last complete checkpoint is intact
    if processes == 1:
        assert leftovers(out) == []
    else:  # another process may still have been writing into the failed checkpoint's staging: the next start clears it
        assert all(Path(path).parent == out / "checkpoints" and ".step_" in path for path in leftovers(out))
    return line


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_stops_in_one_line_and_the_run_resumes_on_another_disk(
    unbroken, cifar10_dir, small_disk, tmp_path
):
    reference, _ = unbroken
    disk = half_run_disk(reference, small_disk)
    out = disk / "out"
    recipe = recipe_for(cifar10_dir, tmp_path, out)
    result = finetune(recipe)
    line = assert_stopped_for_space(result, out)
    steps = saved_steps(out)
    assert steps and max(steps) < 12 and not (out / "results.json").exists()
    assert "for each checkpoint" in line
    print(f"tmpfs of {shutil.disk_usage(disk).total} bytes full after step {max(steps)}: {line}")

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    result = finetune(recipe, "--resume", "auto", "--set", f"output.dir={moved}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {moved}" in result.stdout + result.stderr
    print("max weight difference after the move:", assert_unbroken(moved, reference))


@pytest.mark.slow
def test_a_disk_that_fills_under_two_processes_stops_them_in_one_line_and_the_run_resumes(
    unbroken, cifar10_dir, small_disk, tmp_path
):
    reference, _ = unbroken
    out = half_run_disk(reference, small_disk) / "out"
    recipe = recipe_for(cifar10_dir, tmp_path, out)
    micro_batches = ["--set", "train.micro_batch_size=16"]  # each process's half of the global batch
    launch = [*accelerate_quiet_two_processes(), str(recipe), *micro_batches]
    result = subprocess.run(launch, capture_output=True, text=True, env=offline_env(), timeout=300)
    line = assert_stopped_for_space(result, out, processes=2)  # accelerate launch -q exits 1, as the run does
    steps = saved_steps(out)
    assert steps and max(steps) < 12 and not (out / "results.json").exists()
    print(f"two processes, tmpfs full after step {max(steps)}: {line}")

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    result = finetune(recipe, "--resume", "auto", "--set", f"output.dir={moved}", *micro_batches, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in train_rows(moved)] == list(range(1, 13)) and leftovers(moved) == []
    # Two processes sum their gradients in another order than one: the same weights up to float32's rounding.
    difference = max_difference(weights(moved), weights(reference))
    assert difference <= 1e-6
    print("max weight difference from the one-process unbroken run:", difference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment",
    ["update@1", "write results.json@12", "write README.md@12"],
    ids=["train-log", "export", "card"],
)
def test_a_full_disk_at_a_log_the_export_or_the_card_stops_in_one_line(moment, cifar10_dir, small_disk, tmp_path):
    disk = small_disk(4 << 20)
    out = disk / "out"
    marker = tmp_path / "full"
    process = start(recipe_for(cifar10_dir, tmp_path, out), pause_at=moment, marker=marker)
    wait_paused(process, marker)
    fill(disk)
    marker.unlink()  # go on, onto a full disk
    process.wait(timeout=300)
    stderr = marker.with_suffix(".log").read_text()
    line = assert_stopped_for_space(subprocess.CompletedProcess([], process.returncode, "", stderr), out)
    assert ("no checkpoint was written yet" in line) == (moment == "update@1")


# --- a damaged checkpoint, torn logs, a pickled call -------------------------------------------------------


def copy_of(reference: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the finished unbroken run to resume, without what the finish wrote."""
    out = shutil.copytree(reference, tmp_path / name)
    for leftover in ("results.json", "model.safetensors", "README.md"):
        (out / leftover).unlink()
    return out


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_and_torn_log_lines_are_passed_over_with_a_warning(unbroken, cifar10_dir, tmp_path):
    reference, _ = unbroken
    out = copy_of(reference, tmp_path, "out")
    flip_a_byte(out / "checkpoints" / "step_12" / "optimizer.bin")  # same size, another checksum
    for name, torn in (("train_log.jsonl", '{"step": 13, "lo'), ("eval_log.jsonl", '{"step": 12, "split": "te')):
        with open(out / name, "a") as log:
            log.write(torn)  # a kill or a full disk in the middle of a line
    result = finetune(recipe_for(cifar10_dir, tmp_path, out), "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: passing over")]
    assert warning == [
        f"warning: passing over the damaged checkpoint {out}/checkpoints/step_12 (optimizer.bin differs from what "
        f"was saved (its SHA-256)); resuming from {out}/checkpoints/step_10"
    ]
    assert f"resumed from {out}/checkpoints/step_10 at step 10" in result.stdout + result.stderr
    print("max weight difference past a damaged checkpoint:", assert_unbroken(out, reference))


@pytest.mark.slow
def test_with_every_checkpoint_damaged_the_resume_stops_in_one_line(unbroken, cifar10_dir, tmp_path):
    reference, _ = unbroken
    out = copy_of(reference, tmp_path, "out")
    (out / "checkpoints" / "step_10" / "model.safetensors").write_bytes(b"")
    (out / "checkpoints" / "step_12" / "custom_checkpoint_1.pkl").unlink()
    result = finetune(recipe_for(cifar10_dir, tmp_path, out), "--resume", "auto")
    assert result.returncode == 2
    assert one_error_line(result) == (
        f"error: no complete checkpoint to resume from in {out}/checkpoints: {out}/checkpoints/step_12 "
        f"(custom_checkpoint_1.pkl is missing); {out}/checkpoints/step_10 (model.safetensors holds 0 bytes, "
        f"{(reference / 'checkpoints' / 'step_10' / 'model.safetensors').stat().st_size} when saved): remove the "
        "damaged ones to start afresh"
    )


@pytest.mark.slow  # for its fixture, the unbroken run
def test_the_check_finds_each_kind_of_damage(unbroken, tmp_path):
    reference, _ = unbroken
    original = reference / "checkpoints" / "step_12"
    assert checkpoint_damage(original) is None

    def damaged(change) -> str | None:
        folder = shutil.copytree(original, tmp_path / f"case{len(list(tmp_path.iterdir()))}")
        change(folder)
        return checkpoint_damage(folder)

    assert damaged(lambda f: (f / "scheduler.bin").unlink()) == "scheduler.bin is missing"
    assert damaged(lambda f: (f / "best" / "config.json").unlink()) == "best/config.json is missing"
    assert damaged(lambda f: flip_a_byte(f / "model.safetensors")) == (
        "model.safetensors differs from what was saved (its SHA-256)"
    )
    assert damaged(lambda f: (f / "manifest.json").write_text('{"files": ')) == "manifest.json does not load"
    # A checkpoint from before manifests: every file must load.
    assert damaged(lambda f: (f / "manifest.json").unlink()) is None

    def truncated_without_manifest(folder: Path) -> None:
        (folder / "manifest.json").unlink()
        path = folder / "optimizer.bin"
        path.write_bytes(path.read_bytes()[:100])

    assert damaged(truncated_without_manifest).startswith("optimizer.bin does not load")


def test_a_torn_last_log_line_is_dropped_and_a_damaged_one_elsewhere_is_one_line(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_rows(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    log.write_text('{"step": 1, "loss": 2.0}\n\x00\x00\x00\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(Exception, match=r"train_log.jsonl, line 2: not a JSON row: the log is damaged"):
        read_rows(log)


class PickledCall:
    """What a hostile checkpoint may hold: unpickling it runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.slow
def test_a_custom_state_that_pickles_a_call_is_refused_and_the_call_never_runs(unbroken, cifar10_dir, tmp_path):
    # The weight average's state, which Accelerate's load_state would unpickle with weights_only=False.
    reference, _ = unbroken
    state = "custom_checkpoint_1.pkl"
    out = copy_of(reference, tmp_path, "out")
    ran = tmp_path / "the call ran"
    checkpoint = out / "checkpoints" / "step_12"
    saved = torch.load(checkpoint / state, weights_only=True)
    saved["pickled_call"] = PickledCall(f"touch '{ran}'")
    torch.save(saved, checkpoint / state)
    write_manifest(checkpoint)  # a hostile checkpoint comes with a manifest that matches it
    result = finetune(recipe_for(cifar10_dir, tmp_path, out), "--resume", "auto")
    assert result.returncode == 2
    assert one_error_line(result) == (
        f"error: {checkpoint / state}: refused: it pickles posix.system, which a checkpoint of this project never holds"
    )
    assert not ran.exists()


def test_what_a_killed_writer_left_is_cleared_and_a_half_swapped_folder_put_back(tmp_path):
    out = tmp_path / "out"
    checkpoints = out / "checkpoints"
    # Killed between atomic_dir's two renames: the earlier best retired, the new one still staged.
    retired = checkpoints / ".best.old-k2j3h4g5" / "best"
    retired.mkdir(parents=True)
    (retired / "model.safetensors").write_text("the earlier best")
    (checkpoints / ".best.tmp-a1b2c3d4").mkdir()
    (checkpoints / ".step_4.tmp").mkdir()  # a checkpoint's staging
    (checkpoints / ".step_2.old-removed").mkdir()  # a pruned checkpoint, half deleted
    (out / ".recipe.tmp-x9y8z7w6.json").write_text("{")
    (out / ".files.tmp-q1w2e3r4").mkdir()
    (out / "notes.tmp").write_text("the user's")  # not a name of ours
    assert clear_leftovers(out) == [".files.tmp-q1w2e3r4", ".recipe.tmp-x9y8z7w6.json"]
    assert clear_leftovers(checkpoints) == [".best.old-k2j3h4g5", ".best.tmp-a1b2c3d4", ".step_2.old-removed",
                                            ".step_4.tmp"]  # fmt: skip
    assert sorted(p.name for p in out.rglob("*")) == ["best", "checkpoints", "model.safetensors", "notes.tmp"]
    assert (checkpoints / "best" / "model.safetensors").read_text() == "the earlier best"


# --- a folder in use ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_is_unharmed(unbroken, cifar10_dir, tmp_path):
    reference, _ = unbroken
    out = tmp_path / "out"
    recipe = recipe_for(cifar10_dir, tmp_path, out)
    marker = tmp_path / "holding"
    holder = start(recipe, pause_at="update@3", marker=marker)  # alive, between two updates
    wait_paused(holder, marker)
    refusal = (
        f"error: output.dir {out} is in use by another run (process {holder.pid} on {os.uname().nodename}): wait for "
        "it to end, stop it, or choose another output.dir"
    )
    for command, code in (
        ([sys.executable, "-m", "vit_hf.finetune"], 2),
        ([sys.executable, "-m", "vit_hf.finetune", "--resume", "auto"], 2),
        # accelerate launch -q exits 1 whatever its processes' code
        ([*accelerate_quiet_two_processes(), "--resume", "auto", "--set", "train.micro_batch_size=16"], 1),
    ):
        started = time.monotonic()
        result = subprocess.run([*command, str(recipe)], capture_output=True, text=True, env=offline_env(), timeout=300)
        assert result.returncode == code, result.stderr[-3000:]
        assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [refusal], result.stderr
        assert "Traceback" not in result.stderr
        print(f"refused in {time.monotonic() - started:.1f} s: {' '.join(command[-3:])}")
    # At once: before the imports that take seconds (torch comes with Accelerate's tracker names, which the recipe's
    # check reads).
    heavy = ["transformers", "datasets", "vit_hf.training.loop"]
    script = (
        "import sys\nfrom vit_hf.finetune import main\ntry:\n    main(sys.argv[1:])\n"
        f"finally:\n    print([m for m in {heavy} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", script, str(recipe)], capture_output=True, text=True,
                            env=offline_env(), timeout=300)  # fmt: skip
    assert result.returncode == 2 and result.stderr == refusal + "\n", result.stderr
    assert result.stdout.strip() == "[]"
    marker.unlink()
    assert holder.wait(timeout=300) == 0, marker.with_suffix(".log").read_text()[-3000:]
    print("max weight difference of the first run:", assert_unbroken(out, reference))


# --- a push that fails mid-way -----------------------------------------------------------------------------


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Just enough of the Hub's API for `upload_folder`: every file is sent in the commit itself. The first `drops`
    commits lose their connection halfway through their upload."""

    drops = 0
    committed: dict[str, bytes] = {}

    def log_message(self, format, *args) -> None:
        pass

    def _reply(self, value: dict) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        self.send_error(404)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers["Content-Length"])
        if "/commit/" in self.path and FakeHub.drops > 0:
            FakeHub.drops -= 1
            self.rfile.read(length // 2)
            self.connection.shutdown(socket.SHUT_RDWR)  # mid-way: no answer, the connection gone
            self.close_connection = True
            return
        body = self.rfile.read(length)
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            self._reply({"url": f"{base}/user/tiny-vit", "name": "user/tiny-vit", "id": "1"})
        elif self.path == "/api/validate-yaml":
            self._reply({})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        elif "/commit/" in self.path:
            for line in body.decode().splitlines():
                row = json.loads(line)
                if row["key"] == "file":
                    FakeHub.committed[row["value"]["path"]] = base64.b64decode(row["value"]["content"])
            self._reply({"commitUrl": f"{base}/user/tiny-vit/commit/{'a' * 40}", "commitOid": "a" * 40})
        else:
            self.send_error(404)


@pytest.fixture
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeHub.drops, FakeHub.committed = 0, {}
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def push(out: Path, endpoint: str) -> subprocess.CompletedProcess:
    env = offline_env() | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_test_token"}
    return subprocess.run(
        [sys.executable, "-m", "vit_hf.push", str(out), "--model-id", "user/tiny-vit"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of OUT but the card, which each push writes afresh for its repository."""
    return {
        str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "README.md"
    }


@pytest.mark.slow
def test_a_push_that_loses_its_connection_mid_way_keeps_the_folder_and_can_be_retried(unbroken, fake_hub, tmp_path):
    reference, _ = unbroken
    out = shutil.copytree(reference, tmp_path / "out")
    before = snapshot(out)
    FakeHub.drops = 6  # the first try and the Hub client's 5 retries
    result = push(out, fake_hub)
    assert result.returncode == 1, result.stderr[-3000:]
    assert one_error_line(result) == (
        "error: the upload to the Hub repository user/tiny-vit failed mid-way (Server disconnected without sending a "
        f"response.); the local folder {out} is intact: retry with python -m vit_hf.push {out} --model-id user/tiny-vit"
    )
    assert snapshot(out) == before and leftovers(out) == [] and FakeHub.committed == {}

    result = push(out, fake_hub)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"pushed {out} to {fake_hub}/user/tiny-vit/commit/")
    assert FakeHub.committed["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert FakeHub.committed["README.md"] == (out / "README.md").read_bytes()
    assert set(FakeHub.committed) >= {"config.json", "preprocessor_config.json", "recipe.json", "results.json"}


def test_a_run_stopped_by_bad_data_after_taking_the_folder_leaves_no_folder_behind(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    recipe = tiny_recipe(cifar10_dir, out)
    recipe["data"]["dataset"] = {"path": str(tmp_path / "no_such_folder")}
    with pytest.raises(UserError, match="no_such_folder"):
        run_here(recipe)
    assert not out.exists()
