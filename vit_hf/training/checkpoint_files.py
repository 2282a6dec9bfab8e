"""What a checkpoint folder must hold, and the check a resume makes before it trusts one.

A checkpoint records every file's size and SHA-256 in `manifest.json`, written last, before the folder gets its final
name; a resume reads every file against it. A folder without a manifest (written before there were any) is checked
the slower way: every expected file is present and loads.
"""

import hashlib
import json
import pickle
import re
from pathlib import Path

import torch
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file

from vit_hf.utils.errors import UserError
from vit_hf.utils.files import write_json

MANIFEST = "manifest.json"
# The files of every checkpoint (a model and an optimizer besides, under names that depend on FSDP's layout).
EXPECTED = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "augment_rng_0.pt", "scheduler.bin")
MODEL, OPTIMIZER = re.compile(r"^(model|pytorch_model)"), re.compile(r"^optimizer")
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file under FOLDER in FOLDER/manifest.json (atomically), last of all."""
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in _files(folder)
    }
    write_json(folder / MANIFEST, {"files": files})


def load_weights_only(path: Path) -> object:
    """A `torch.save` file of tensors and plain values; a one-line UserError for one that pickles anything else (a
    call, a class), which is never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"it pickles {found[1]}" if found else "it pickles more than tensors and plain values"
        raise UserError(f"{path}: refused: {what}, which a checkpoint of this project never holds") from None


def _missing(folder: Path) -> str | None:
    names = {path.name for path in folder.iterdir()}
    for name in EXPECTED:
        if name not in names:
            return f"{name} is missing"
    for pattern, what in ((MODEL, "the model"), (OPTIMIZER, "the optimizer state")):
        if not any(pattern.match(name) for name in names):
            return f"{what} is missing"
    return None


def _unloadable(folder: Path) -> str | None:
    """The first file under FOLDER that does not load (a folder without a manifest), or None."""
    for path in _files(folder):
        try:
            if path.suffix == ".safetensors":
                load_file(path)
            elif path.suffix in (".bin", ".pkl", ".pt"):
                accelerate_load(path, map_location="cpu")
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except (OSError, RuntimeError, ValueError, SafetensorError, pickle.UnpicklingError, EOFError) as error:
            return f"{path.relative_to(folder)} does not load ({' '.join(str(error).split())[:120]})"
    return None


def checkpoint_damage(folder: Path) -> str | None:
    """What is wrong with the checkpoint FOLDER, in a few words, or None where it is complete."""
    if not folder.is_dir():
        return "it is not a folder"
    missing = _missing(folder)
    if missing is not None:
        return missing
    if not (folder / MANIFEST).is_file():
        return _unloadable(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} does not load"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["size"]:
            return f"{name} holds {path.stat().st_size} bytes, {record['size']} when saved"
        if _sha256(path) != record["sha256"]:
            return f"{name} differs from what was saved (its SHA-256)"
    return None
