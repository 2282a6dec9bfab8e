"""Checkpoint download: a local HTTP server on 127.0.0.1 stands in for the official bucket."""

import http.server
import threading

import numpy as np
import pytest
from official_vit import random_params, write_checkpoint

from vit_hf.models import download as dl
from vit_hf.models.conversion import load_npz
from vit_hf.utils.errors import UserError


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files` with Range support; `drop_after[path]` bytes end the first response early."""

    files: dict[str, bytes] = {}
    drop_after: dict[str, int] = {}
    requests: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 (the http.server API)
        body = self.files.get(self.path)
        range_header = self.headers.get("Range")
        self.requests.append((self.path, range_header))
        if body is None:
            self.send_error(404)
            return
        start = int(range_header.split("=")[1].rstrip("-")) if range_header else 0
        self.send_response(206 if range_header else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        limit = self.drop_after.pop(self.path, None)
        self.wfile.write(body[start:limit] if limit is not None else body[start:])
        if limit is not None:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.drop_after, _Handler.requests = {}, {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()


def _checkpoint_bytes(tmp_path) -> bytes:
    params = random_params(layers=1, hidden=64, heads=4, mlp=128, patch=4, grid=8, representation=None, classes=10)
    return write_checkpoint(tmp_path / "src.npz", params).read_bytes()


def test_download_then_reuse_the_cached_file(server, tmp_path):
    url, handler = server
    handler.files["/vit_models/tiny.npz"] = _checkpoint_bytes(tmp_path)
    first = dl.download(f"{url}/vit_models/tiny.npz", tmp_path / "cache")
    second = dl.download(f"{url}/vit_models/tiny.npz", tmp_path / "cache")
    assert first == second and first.read_bytes() == handler.files["/vit_models/tiny.npz"]
    assert len(handler.requests) == 1


def test_a_dropped_connection_resumes_where_it_stopped(server, tmp_path):
    url, handler = server
    body = _checkpoint_bytes(tmp_path)
    handler.files["/tiny.npz"] = body
    handler.drop_after["/tiny.npz"] = len(body) // 3
    path = dl.download(f"{url}/tiny.npz", tmp_path / "cache")
    assert path.read_bytes() == body
    assert handler.requests == [("/tiny.npz", None), ("/tiny.npz", f"bytes={len(body) // 3}-")]


def test_a_truncated_file_is_refused_and_not_kept(server, tmp_path):
    url, handler = server
    handler.files["/broken.npz"] = _checkpoint_bytes(tmp_path)[:-200]
    with pytest.raises(UserError, match="not a complete .npz"):
        dl.download(f"{url}/broken.npz", tmp_path / "cache")
    # Nothing of the download is kept; only the (empty) lock file that serialises the machine's downloads remains.
    assert not any(p.is_file() and p.suffix != ".lock" for p in (tmp_path / "cache").rglob("*"))


def test_a_missing_url_is_a_one_line_error(server, tmp_path):
    url, _ = server
    with pytest.raises(UserError, match="HTTP 404"):
        dl.download(f"{url}/nothing.npz", tmp_path / "cache")


def test_an_unreachable_host_says_what_could_not_be_fetched(tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "MAX_ATTEMPTS", 1)
    with pytest.raises(UserError, match="could not be downloaded"):
        dl.download("http://127.0.0.1:9/ViT-B_16.npz", tmp_path / "cache")


def test_load_npz_from_a_url_gives_the_same_model_as_the_local_file(server, tmp_path, monkeypatch):
    url, handler = server
    handler.files["/tiny.npz"] = _checkpoint_bytes(tmp_path)
    monkeypatch.setenv("VIT_HF_CACHE", str(tmp_path / "cache"))
    remote, _ = load_npz(f"{url}/tiny.npz", keep_head=True)
    local, _ = load_npz(tmp_path / "src.npz", keep_head=True)
    for (key, a), b in zip(remote.state_dict().items(), local.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=key)


def test_catalog_names_map_to_the_official_bucket(monkeypatch, tmp_path):
    fetched = []
    monkeypatch.setattr(dl, "download", lambda url, cache: fetched.append(url) or tmp_path)
    for name in ("ViT-B_16", "imagenet21k/ViT-L_32", "imagenet21k+imagenet2012/ViT-B_16", "augreg/B_16"):
        dl.resolve_checkpoint(name)
    assert fetched == [
        "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz",
        "https://storage.googleapis.com/vit_models/imagenet21k/ViT-L_32.npz",
        "https://storage.googleapis.com/vit_models/imagenet21k+imagenet2012/ViT-B_16.npz",
        "https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    ]


@pytest.mark.parametrize(
    "path", ["/vit_models/../../escape.npz", "/a/%2e%2e/%2E%2E/%2e%2e/escape.npz", "/./x.npz", "/"]
)
def test_a_url_whose_path_would_leave_the_cache_is_refused_before_any_request(server, tmp_path, path):
    url, handler = server
    handler.files[path] = _checkpoint_bytes(tmp_path)
    with pytest.raises(UserError, match="not a checkpoint URL"):
        dl.download(f"{url}{path}", tmp_path / "cache" / "deep")
    assert handler.requests == [] and not (tmp_path / "escape.npz").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npz"))
