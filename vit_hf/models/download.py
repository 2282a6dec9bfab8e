"""The official checkpoint catalog, and a resumable, verified download of `.npz` files into a cache folder."""

import http.client
import logging
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from filelock import FileLock
from tqdm.auto import tqdm

from vit_hf.utils.errors import UserError

logger = logging.getLogger(__name__)

BUCKET = "https://storage.googleapis.com/vit_models"

# Short names of the official releases (google-research/vision_transformer). The bare names are the
# ImageNet-21k pre-trained files the paper fine-tunes from; `imagenet21k+imagenet2012/...` are those files
# fine-tuned on ImageNet at 384 px (the `-224` ones at 224 px); `augreg/...` are the checkpoints recommended
# by "How to train your ViT?" (Steiner et al., 2021), pre-trained on ImageNet-21k.
_AUGREG_RECOMMENDED = {
    "Ti_16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
    "S_32": "S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0",
    "S_16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "B_32": "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0",
    "B_16": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "B_8": "B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0",
    "L_16": "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0",
}
CATALOG: dict[str, str] = {
    **{
        name: f"{BUCKET}/imagenet21k/{name}.npz"
        for name in ("ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14")
    },
    **{
        f"imagenet21k+imagenet2012/{name}": f"{BUCKET}/imagenet21k+imagenet2012/{name}.npz"
        for name in ("ViT-B_16", "ViT-B_16-224", "ViT-B_32", "ViT-L_16", "ViT-L_16-224", "ViT-L_32")
    },
    **{f"augreg/{short}": f"{BUCKET}/augreg/{file}.npz" for short, file in _AUGREG_RECOMMENDED.items()},
}
CATALOG.update({f"imagenet21k/{name}": url for name, url in list(CATALOG.items()) if name.startswith("ViT-")})

CHUNK_BYTES = 1 << 20
MAX_ATTEMPTS = 5


def cache_dir() -> Path:
    """Where downloaded checkpoints live: $VIT_HF_CACHE, else ~/.cache/vit_hf."""
    return Path(os.environ.get("VIT_HF_CACHE", Path.home() / ".cache" / "vit_hf"))


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def resolve_checkpoint(source: str | os.PathLike, cache: Path | None = None) -> Path:
    """A local `.npz` for SOURCE: a path, an http(s) URL or a catalog name (downloaded once, then cached)."""
    source = str(source)
    if source in CATALOG:
        source = CATALOG[source]
    if is_url(source):
        return download(source, cache or cache_dir())
    path = Path(source).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(name for name in CATALOG if "/" not in name))
        raise UserError(f"{source}: no such file, and not a URL or catalog name (catalog: {known}, ...)")
    return path


def cached_path(url: str, cache: Path) -> Path:
    """Where URL is kept in CACHE: host/path. A URL whose path would leave the cache (`..` segments, encoded or
    not) is refused: the cache is no place for a server to write anywhere else."""
    parsed = urlparse(url)
    parts = [part for part in unquote(parsed.path).split("/") if part]
    if not parsed.netloc or not parts or any(part in (".", "..") for part in parts):
        raise UserError(f"{url}: not a checkpoint URL (it needs a host and a file path without '.' or '..' segments)")
    target = cache.joinpath(parsed.netloc.replace(":", "_"), *parts)
    if not target.resolve().is_relative_to(cache.resolve()):
        raise UserError(f"{url}: its file would leave the checkpoint cache {cache}")
    return target


def download(url: str, cache: Path) -> Path:
    """Download URL into CACHE once, resuming a partial file, and check that it is a complete zip (npz).

    The processes of a machine share its cache: one downloads under a file lock while the others wait for it.
    """
    target = cached_path(url, cache)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(target.name + ".lock")):
        if not target.is_file():  # else another process downloaded it while this one waited
            _download_into(url, target)
    return target


def _download_into(url: str, target: Path) -> None:
    """Fetch URL to TARGET through a `.part` file, retrying and resuming it, then check it."""
    partial = target.with_name(target.name + ".part")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            if _fetch_into(url, partial):
                break
        except (OSError, http.client.HTTPException) as error:
            if isinstance(error, urllib.error.HTTPError) and error.code < 500:
                raise UserError(f"{url}: HTTP {error.code} {error.reason}") from None
            if attempt == MAX_ATTEMPTS:
                raise UserError(
                    f"{url}: could not be downloaded ({error}); fetch it by hand and give the local .npz path instead "
                    "(model.pretrained in a recipe)"
                ) from None
            logger.warning("download of %s interrupted (%s); resuming (attempt %d)", url, error, attempt + 1)
    _check_complete_zip(partial, url)
    partial.rename(target)


def _fetch_into(url: str, partial: Path) -> bool:
    """Append the rest of URL to PARTIAL; True when the server says the file is complete."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416:  # Range not satisfiable: we already hold every byte.
            return True
        raise
    with response:
        if have and response.status != 206:  # The server ignored the range: start again.
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if have else "wb"
        with (
            open(partial, mode) as file,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=Path(url).name) as bar,
        ):
            while chunk := response.read(CHUNK_BYTES):
                file.write(chunk)
                bar.update(len(chunk))
    size = partial.stat().st_size
    if total is not None and size < total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")
    return True


def _check_complete_zip(path: Path, url: str) -> None:
    """An npz is a zip: a truncated download has no central directory or fails its CRCs."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        bad = "the zip directory"
    if bad is not None:
        path.unlink()
        raise UserError(f"{url}: the downloaded file is not a complete .npz ({bad} is damaged); run again to refetch")
