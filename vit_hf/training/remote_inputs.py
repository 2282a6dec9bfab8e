"""The remote inputs of a recipe (checkpoint, data set, Hub model), checked before any is loaded.

Offline (no network, or HF_HUB_OFFLINE=1), a run would otherwise spend its first minute on retries and then report
only the first missing input. This lists every input that is neither local nor cached and cannot be fetched, in one
line, with how to point the recipe at local files.
"""

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import datasets
import huggingface_hub
from huggingface_hub import constants as hub_constants

from vit_hf.data.sources import HUB_NAMES
from vit_hf.models.download import CATALOG, cache_dir, cached_path, is_url
from vit_hf.utils.errors import UserError

# How long a host may take to accept a connection before it counts as out of reach.
CONNECT_SECONDS = 3.0
# data.dataset's `path` values that are datasets' own readers of local or listed files, not Hub ids.
PACKAGED_READERS = frozenset(datasets.packaged_modules._PACKAGED_DATASETS_MODULES)


@dataclass(frozen=True)
class RemoteInput:
    """One input that must come over the network: the recipe field, what it names, and where it would come from."""

    field: str
    name: str
    url: str
    hub: bool  # fetched through the Hub libraries (HF_HUB_OFFLINE applies), else by plain HTTP


def check_remote_inputs(recipe: dict) -> None:
    """Refuse, in one line, a recipe whose remote inputs are not cached and cannot be fetched now."""
    unreachable = [(item, why) for item in remote_inputs(recipe) if (why := _cannot_fetch(item))]
    if not unreachable:
        return
    listed = "; ".join(f"{item.field} {item.name!r} ({item.url}: {why})" for item, why in unreachable)
    raise UserError(
        f"offline: {listed}. Point the recipe at local files: model.pretrained at a local .npz or model folder, "
        """data.dataset at local files, e.g. --set data.dataset='{"path": "FOLDER"}' (parquet files or an image """
        "folder); see docs/troubleshooting.md"
    )


def remote_inputs(recipe: dict) -> list[RemoteInput]:
    """The inputs of RECIPE that are neither local files nor already in a cache."""
    found = [_checkpoint(recipe["model"]["pretrained"]), _dataset(recipe["data"]["dataset"])]
    return [item for item in found if item is not None]


def _checkpoint(source: str | None) -> RemoteInput | None:
    if source is None or Path(source).expanduser().exists():
        return None
    if source in CATALOG or is_url(source):
        url = CATALOG.get(source, source)
        return None if cached_path(url, cache_dir()).is_file() else RemoteInput("model.pretrained", source, url, False)
    if source.endswith(".npz"):
        return None  # a local file that is missing: the loader names it
    cached = huggingface_hub.try_to_load_from_cache(source, "config.json")
    return None if isinstance(cached, str) else RemoteInput("model.pretrained", source, _hub_url(source), True)


def _dataset(dataset: str | dict) -> RemoteInput | None:
    if isinstance(dataset, str):
        dataset = {"path": HUB_NAMES.get(dataset, dataset)}
    path = dataset.get("path")
    if "cifar_archive" in dataset or not path or Path(path).expanduser().exists():
        return None
    if path in PACKAGED_READERS:
        urls = [file for file in _listed_files(dataset.get("data_files")) if "://" in file]
        return RemoteInput("data.dataset.data_files", path, urls[0], urls[0].startswith("hf://")) if urls else None
    if _hub_dataset_cached(path):
        return None
    return RemoteInput("data.dataset", path, _hub_url(f"datasets/{path}"), True)


def _listed_files(files: str | list | dict | None) -> list[str]:
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [file for value in files.values() for file in _listed_files(value)]
    return [file for value in files or [] for file in _listed_files(value)]


def _hub_dataset_cached(repo_id: str) -> bool:
    """Whether the Hub's file cache or datasets' own cache holds anything of REPO_ID."""
    hub_folder = Path(hub_constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    arrow_folder = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    return any(folder.is_dir() and any(folder.iterdir()) for folder in (hub_folder, arrow_folder))


def _hub_url(repo: str) -> str:
    return f"{hub_constants.ENDPOINT.rstrip('/')}/{repo}"


def _cannot_fetch(item: RemoteInput) -> str | None:
    """Why ITEM cannot be fetched now, or None where its host answers."""
    if item.hub and hub_constants.HF_HUB_OFFLINE:
        return "not cached, and HF_HUB_OFFLINE is set"
    if item.url.startswith("hf://"):
        item = RemoteInput(item.field, item.name, hub_constants.ENDPOINT, True)
    parsed = urlparse(item.url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        return f"not cached, and {parsed.hostname}:{port} is out of reach ({error.strerror or error})"
    return None
