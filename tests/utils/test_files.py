"""Atomic writes: complete or absent, and readable by others as the umask says (an ordinary open() would be)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from launch import offline_env

from vit_hf.utils.files import atomic_dir, atomic_file, atomic_files_into, write_json, write_text

UMASKS = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700), 0o002: (0o664, 0o775)}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=sorted(UMASKS), ids=lambda mask: f"umask{mask:03o}")
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_files_and_folders_get_the_mode_of_an_ordinary_open_under_the_umask(umask, tmp_path):
    file_mode, folder_mode = UMASKS[umask]
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    assert (mode(tmp_path / "plain.txt"), mode(tmp_path / "plain")) == (file_mode, folder_mode)  # the reference

    assert mode(write_json(tmp_path / "results.json", {"a": 1})) == file_mode
    assert mode(write_text(tmp_path / "README.md", "card")) == file_mode
    with atomic_file(tmp_path / "grid.png") as staging:
        staging.write_bytes(b"png")
    assert mode(tmp_path / "grid.png") == file_mode
    with atomic_dir(tmp_path / "model") as staging:
        (staging / "model.safetensors").write_bytes(b"w")
    assert mode(tmp_path / "model") == folder_mode
    assert mode(tmp_path / "model" / "model.safetensors") == file_mode
    with atomic_files_into(tmp_path / "out") as staging:
        (staging / "config.json").write_text("{}")
    assert mode(tmp_path / "out") == folder_mode and mode(tmp_path / "out" / "config.json") == file_mode
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left behind


def test_a_replaced_file_takes_the_new_mode_and_a_failed_write_leaves_the_old_content(umask, tmp_path):
    path = write_json(tmp_path / "recipe.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_file(path) as staging:
        staging.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n  "v": 1\n}\n' and mode(path) == UMASKS[umask][0]
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.json"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_converted_model_folder_is_readable_as_the_umask_says(jax_reference_dir, tmp_path, mask):
    out = tmp_path / "converted"
    command = [sys.executable, "-m", "vit_hf.convert", str(jax_reference_dir / "tiny_token.npz"), str(out)]
    result = subprocess.run([*command, "--num-labels", "10"], env=offline_env(), umask=mask, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
    file_mode, folder_mode = UMASKS[mask]
    assert mode(out) == folder_mode
    found = {path.name: mode(path) for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(found)
    assert set(found.values()) == {file_mode}, found
