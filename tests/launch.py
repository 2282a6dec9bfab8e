"""Run a `vit_hf` command line in real processes: one, or several gloo processes on the CPU."""

import os
import random
import socket
import subprocess
import sys

import pytest


def in_ci() -> bool:
    """Whether this is a CI run: the CI variable that CI services and .ci/run set, "true" or "1"."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def offline_env() -> dict:
    """The environment of a test process: no Hub, one thread a process (two processes share 2 cores)."""
    return os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A free port for a job's rendezvous, from a range of this pytest-xdist worker's own (2,000 ports below the
    kernel's ephemeral range): a port is free when chosen and bound by the job a moment later, so two workers that
    both asked the kernel for any free port could start two jobs on one port, whose processes would then meet."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % 10
    first = 10000 + 2000 * worker
    for port in random.Random().sample(range(first, first + 2000), 2000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + 1999}")


def run_module(
    module: str, args: list[str], processes: int = 1, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS`, or `accelerate launch --multi_gpu` with PROCESSES gloo processes on the CPU; ENV adds
    to the offline environment."""
    if processes == 1:
        command = [sys.executable, "-m", module]
    else:
        port = free_port()
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port), "-m", module]  # fmt: skip
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=offline_env() | (env or {}), timeout=timeout
    )


def run_in_process(main, args, capsys) -> tuple[int, str, str]:
    """A CLI `main` run in this process: its exit code, stdout and stderr."""
    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(main, argv: list[str], capsys) -> str:
    """The stderr of a CLI `main` that must stop with exit code 2 and exactly one `error: ...` line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    return stderr
