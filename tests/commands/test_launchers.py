"""A bad recipe under the documented launchers: our one `error:` line, once, and no traceback of ours.

`accelerate launch -q` (Accelerate's quiet flag, shown in the docs) keeps Accelerate's own traceback away; it ends
with exit code 1 whatever the process's own code (2 here). torchrun has no such flag: after our line it prints its
failure summary, which the docs say.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch import free_port, offline_env

OUR_LINE = 'train.micro_batch_size: expected a positive integer or "auto", got "big"'
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "accelerate_configs"


def launch(tmp_path: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    recipe = tmp_path / "bad.json"
    recipe.write_text(json.dumps({"train": {"micro_batch_size": "big"}, "output": {"dir": str(tmp_path / "out")}}))
    command = [*launcher, "-m", "vit_hf.finetune", str(recipe)]
    return subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=300)


def our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


def accelerate(*flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "-q", *flags, "--main_process_port", str(free_port())]


def test_accelerate_launch_quiet_with_one_process_prints_just_our_line(tmp_path):
    result = launch(tmp_path, accelerate("--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                                         "--dynamo_backend", "no"))  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.json'}: {OUR_LINE}"], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_accelerate_launch_quiet_with_two_processes_prints_our_line_once_and_no_traceback(tmp_path):
    result = launch(tmp_path, accelerate("--config_file", str(ACCELERATE_CONFIGS / "cpu.yaml")))
    assert result.returncode == 1
    assert our_lines(result.stderr) == [f"error: {tmp_path / 'bad.json'}: {OUR_LINE}"], result.stderr
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_prints_our_line_once_before_its_own_summary(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port())]  # fmt: skip
    result = launch(tmp_path, torchrun)
    assert result.returncode == 1
    assert our_lines(result.stderr) == [f"error: {tmp_path / 'bad.json'}: {OUR_LINE}"], result.stderr
    assert result.stderr.index(OUR_LINE) < result.stderr.index("ChildFailedError")
