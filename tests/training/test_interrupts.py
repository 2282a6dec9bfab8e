"""Ctrl-C and SIGTERM with the log piped to `tee`: the signal ends tee too, and the run still saves and exits 128 + N.

The terminal sends Ctrl-C to the whole foreground pipeline. tee exits at once, and every later write of the run's
progress bar or log to the pipe fails: such writes are dropped, and the run saves its checkpoint as it would
unpiped.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from launch import offline_env
from runs import finetune, tiny_recipe, train_rows, write_recipe

TOTAL = 40


# `accelerate launch` (one process) answers Ctrl-C itself: it exits 130 after sending SIGTERM to the whole process
# tree, the data workers included, and SIGKILL 5 s later.
ACCELERATE = ["-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
CASES = {
    "ctrl-c": (signal.SIGINT, []),
    "sigterm": (signal.SIGTERM, []),
    "accelerate-ctrl-c": (signal.SIGINT, ACCELERATE),
}


@contextlib.contextmanager
def ctrl_c_as_in_a_terminal() -> Iterator[None]:
    """Start processes with Ctrl-C at its default, as a terminal's foreground pipeline has it. A job started in the
    background (`... &`, as some CI runners do) ignores SIGINT, and its children inherit that; a handler set here is
    reset to the default in a child by exec."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_signal_to_a_run_piped_to_tee_saves_a_checkpoint_and_exits_128_plus_n(cifar10_dir, tmp_path, case):
    signum, launcher = CASES[case]
    out, log = tmp_path / "out", tmp_path / "train.log"
    recipe = tiny_recipe(cifar10_dir, out, schedule={"name": "cosine", "warmup_steps": 2, "total_steps": TOTAL},
                         train={"save_every": 1000, "eval_every": 1000, "log_every": 1})  # fmt: skip
    recipe["data"]["num_workers"] = 2  # workers must outlive the signal until the checkpoint is saved
    recipe_path = write_recipe(tmp_path, recipe)
    command = [sys.executable, *launcher, "-m", "vit_hf.finetune", str(recipe_path)]
    with ctrl_c_as_in_a_terminal():
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=offline_env(),
                               process_group=0)  # fmt: skip
        # tee in the run's process group, as a shell pipeline puts it: a signal to the group reaches both.
        tee = subprocess.Popen(["tee", str(log)], stdin=run.stdout, stdout=subprocess.DEVNULL, process_group=run.pid)
    run.stdout.close()
    try:
        deadline = time.monotonic() + 240
        while not _updates_shown(log) >= 3 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        assert _updates_shown(log) >= 3, log.read_text() if log.exists() else "no log"
        os.killpg(run.pid, signum)
        code = run.wait(timeout=240)
    finally:
        run.kill()
        tee.kill()
    assert tee.wait() == -signum  # the reader is gone: every later write of the run went to a closed pipe
    assert code == 128 + signum
    saved = sorted(path.name for path in (out / "checkpoints").glob("step_*"))
    assert len(saved) == 1, saved
    stopped_at = int(saved[0].removeprefix("step_"))
    assert 3 <= stopped_at < TOTAL
    assert [row["step"] for row in train_rows(out)] == list(range(1, stopped_at + 1))

    # And the run goes on from there, in a process of its own: its data workers fork, and this test process may
    # have threads (JAX's, from another test) that a fork must not copy mid-lock.
    resumed = finetune(recipe_path, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["step"] == TOTAL
    assert [row["step"] for row in train_rows(out)] == list(range(1, TOTAL + 1))


def _updates_shown(log) -> int:
    """The last update count the progress bar has written to the log."""
    found = re.findall(rf"(\d+)/{TOTAL} \[", log.read_text(errors="replace")) if log.exists() else []
    return int(found[-1]) if found else 0


EXITS_WITH_A_LOADER_OPEN = """
import torch
from torch.utils.data import DataLoader
from vit_hf.data.loader import leave_signals_to_the_main_process

loader = DataLoader(list(range(10_000)), batch_size=4, num_workers=2, prefetch_factor=4, persistent_workers=True,
                    worker_init_fn=leave_signals_to_the_main_process)
batches = iter(loader)
next(batches)
"""


def test_a_process_ends_though_its_workers_ignore_sigterm_and_a_loader_is_still_open():
    """multiprocessing ends daemonic children at exit with SIGTERM and waits for them: the workers, which ignore it
    (so that a launcher's SIGTERM does not end them before the checkpoint), must still end."""
    result = subprocess.run([sys.executable, "-c", EXITS_WITH_A_LOADER_OPEN], env=offline_env(), timeout=120)
    assert result.returncode == 0
