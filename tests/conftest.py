"""Shared test set-up: offline Hub access and the read-only material in ../shared."""

import os
from pathlib import Path

import pytest

# Tests never reach the network: the Hub and data-set libraries must work from local files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VIT_HF_SHARED", REPO_ROOT.parent / "shared"))
CIFAR10_DIR = SHARED / "data" / "cifar10"
JAX_REFERENCE_DIR = SHARED / "fixtures" / "vit_jax_reference"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared material (../shared) is only on developer and CI machines")
    return path


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The real CIFAR-10 parquet files (train.parquet, test.parquet)."""
    return _require(CIFAR10_DIR)


@pytest.fixture(scope="session")
def jax_reference_dir() -> Path:
    """The tiny official-layout checkpoint and the logits the official Flax model computed for it."""
    return _require(JAX_REFERENCE_DIR)


@pytest.fixture(params=["region", "pillow"])
def jpeg_decoder(request, monkeypatch) -> str:
    """Each way vit_hf.data decodes a JPEG: libjpeg-turbo's region decode (vit_hf._jpeg, where the install built it)
    and Pillow's whole decode (where it did not)."""
    from vit_hf.data import sources as data

    if request.param == "region" and data._jpeg is None:
        pytest.skip("vit_hf._jpeg is not built (no C compiler or libjpeg-turbo headers at install)")
    if request.param == "pillow":
        monkeypatch.setattr(data, "_jpeg", None)
    return request.param
