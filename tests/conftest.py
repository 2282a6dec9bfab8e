"""Shared test set-up: offline Hub access and the read-only material in ../shared (or $VIT_HF_SHARED).

Where ../shared is absent, the tests that need it skip; in CI (CI=true or CI=1) they fail instead, so that a CI run
that lost the material says so rather than passing on half the suite.
"""

import os
from pathlib import Path

import pytest
from launch import in_ci

# Tests never reach the network: the Hub and data-set libraries must work from local files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VIT_HF_SHARED", REPO_ROOT.parent / "shared"))
CIFAR10_DIR = SHARED / "data" / "cifar10"
JAX_REFERENCE_DIR = SHARED / "fixtures" / "vit_jax_reference"


def _require(path: Path) -> Path:
    """PATH, where it exists; else a skip, or in CI a failure."""
    if not path.exists():
        if in_ci():
            pytest.fail(
                f"{path} is absent: CI must have the shared material (../shared beside the repository, or set "
                "VIT_HF_SHARED to the folder that holds it)",
                pytrace=False,
            )
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
    """Each way vit_hf.data.photos decodes a JPEG: libjpeg-turbo's region decode (vit_hf.data._jpeg, where the install
    built it) and Pillow's whole decode (where it did not)."""
    from vit_hf.data import photos

    if request.param == "region" and photos._jpeg is None:
        pytest.skip("vit_hf._jpeg is not built (no C compiler or libjpeg-turbo headers at install)")
    if request.param == "pillow":
        monkeypatch.setattr(photos, "_jpeg", None)
    return request.param
