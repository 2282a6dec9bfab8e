"""Offline, a recipe's remote inputs are all checked before any is loaded, and refused together in one line."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from launch import offline_env

from vit_hf.models.download import CATALOG, cached_path
from vit_hf.recipe import load_recipe
from vit_hf.training import remote_inputs
from vit_hf.training.remote_inputs import check_remote_inputs
from vit_hf.utils.errors import UserError

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_HF_CACHE", str(tmp_path / "vit_hf_cache"))
    monkeypatch.setattr(remote_inputs.hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(remote_inputs.datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path


def test_the_cli_lists_the_checkpoint_and_the_data_set_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    env = offline_env() | {"HF_HOME": str(tmp_path / "hf"), "VIT_HF_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "vit_hf.finetune", str(RECIPES / "cifar10.json"), "--set", f"output.dir={out}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: offline: "), result.stderr
    assert "model.pretrained 'ViT-B_16'" in lines[0] and "data.dataset 'uoft-cs/cifar10'" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0] and "--set data.dataset=" in lines[0]
    assert not out.exists()


def test_without_a_network_each_unreachable_host_is_named(empty_caches, monkeypatch):
    port = closed_port()
    monkeypatch.setattr(remote_inputs.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(remote_inputs.hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    recipe = load_recipe(
        RECIPES / "cifar10.json", [f"model.pretrained=http://127.0.0.1:{port}/ViT-B_16.npz", "data.dataset=cifar100"]
    )
    with pytest.raises(UserError) as error:
        check_remote_inputs(recipe)
    message = str(error.value)
    assert message.count(f"127.0.0.1:{port} is out of reach") == 2, message
    assert f"model.pretrained 'http://127.0.0.1:{port}/ViT-B_16.npz'" in message
    assert "data.dataset 'uoft-cs/cifar100'" in message


def test_cached_and_local_inputs_are_not_remote(empty_caches, monkeypatch, tmp_path):
    monkeypatch.setattr(remote_inputs.hub_constants, "HF_HUB_OFFLINE", True)
    target = cached_path(CATALOG["ViT-B_16"], tmp_path / "vit_hf_cache")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"npz")
    (tmp_path / "hub" / "datasets--uoft-cs--cifar10" / "snapshots").mkdir(parents=True)
    check_remote_inputs(load_recipe(RECIPES / "cifar10.json"))  # both cached: nothing to refuse

    (tmp_path / "photos").mkdir()
    local = load_recipe(RECIPES / "quickstart_local.json", [f"data.dataset.path={tmp_path / 'photos'}"])
    assert remote_inputs.remote_inputs(local) == []
    parquet = {"path": "parquet", "data_files": {"train": "hf://datasets/someone/data/train.parquet"}}
    remote = remote_inputs.remote_inputs(local | {"data": local["data"] | {"dataset": parquet}})
    assert [(item.field, item.url) for item in remote] == [("data.dataset.data_files", parquet["data_files"]["train"])]
    with pytest.raises(UserError, match="data.dataset.data_files 'parquet'.*HF_HUB_OFFLINE is set"):
        check_remote_inputs(local | {"data": local["data"] | {"dataset": parquet}})
