"""Atomic writes: every file and folder the package writes goes through here.

A file or folder is written beside its destination under a temporary name, flushed to disk, and renamed over it only
when complete, so a crash, a kill or a full disk leaves the earlier version (or nothing), never half of one.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vit_hf.utils.fault_points import fault_point

# The names of this module's temporaries, and of a checkpoint's staging and retired folders: `.NAME.tmp-XXXXXXXX`
# (with the file's suffix), `.NAME.old-XXXXXXXX`, `.files.tmp-XXXXXXXX`, `.step_N.tmp`.
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)(-\w+)?(\.\w+)?$")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entry to disk (a rename is durable only once its folder is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (changing it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_open_would(path: Path) -> Path:
    """Give PATH the mode an ordinary `open()` or `mkdir()` would (0644 and 0755 under umask 022): `mkstemp` and
    `mkdtemp` make their files and folders private, and a model folder must be readable by a serving process."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_umask())
    return path


def _settle_tree(root: Path) -> None:
    """Give every file and folder under ROOT the mode an ordinary `open()` would (some writers, such as
    transformers' `save_pretrained`, go through private temporary files of their own), then flush them to disk."""
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_path(_as_open_would(Path(folder) / name))
        fsync_path(_as_open_would(Path(folder)))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside PATH (same suffix, so writers that infer the format still work) that replaces
    PATH only if the block completes."""
    path = Path(path)
    fault_point(f"write {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    staging = _as_open_would(Path(name))
    try:
        yield staging
        fsync_path(staging)
        fault_point(f"replace {path.name}")
        os.replace(staging, path)
        fsync_path(path.parent)
    finally:
        staging.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write TEXT to PATH atomically."""
    with atomic_file(path) as staging:
        staging.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, value: object) -> Path:
    """Write VALUE as indented JSON to PATH atomically."""
    return write_text(path, json.dumps(value, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside OUT_DIR that replaces OUT_DIR only if the block completes.

    A failure or a kill leaves OUT_DIR as it was (a stale `.tmp-*` sibling at worst), never half-written.
    """
    out_dir = Path(out_dir)
    fault_point(f"write {out_dir.name}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _as_open_would(Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent)))
    try:
        yield staging
        _settle_tree(staging)
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(retired / out_dir.name)
            fault_point(f"replace {out_dir.name}")  # the moment OUT_DIR is missing: `clear_leftovers` puts it back
            staging.rename(out_dir)
            shutil.rmtree(retired)
        else:
            staging.rename(out_dir)
        fsync_path(out_dir.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


@contextlib.contextmanager
def atomic_files_into(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder inside OUT_DIR whose files replace their namesakes in OUT_DIR, each atomically,
    when the block completes (OUT_DIR keeps its other files: a run's folder also holds runs/ and checkpoints/)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".files.tmp-", dir=out_dir))
    try:
        yield staging
        _settle_tree(staging)
        fault_point("replace files")
        for path in staging.iterdir():
            os.replace(path, out_dir / path.name)
        fsync_path(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """A hard link (files written once and replaced only by renames may be shared); a copy where the file system has
    no links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def clear_leftovers(folder: str | os.PathLike) -> list[str]:
    """Remove the temporaries that a killed writer left in FOLDER (not below it); the names removed.

    A kill between the two renames of `atomic_dir` leaves the earlier folder retired and its place empty: it is put
    back. Only the one process that holds the folder (see training.run_folder) may call this.
    """
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        match = LEFTOVER.match(path.name)
        if match is None:
            continue
        retired = path / match["name"]
        if match["kind"] == "old" and retired.exists() and not (folder / match["name"]).exists():
            retired.rename(folder / match["name"])
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    if removed:
        fsync_path(folder)
    return removed


def public_name(value: str) -> str:
    """What a published file may say of VALUE: a local file's or folder's base name (the training machine's paths
    stay on it); a URL, a Hub name or a catalog name as it is."""
    if "://" in value or not (Path(value).is_absolute() or Path(value).exists()):
        return value
    return Path(value).name
