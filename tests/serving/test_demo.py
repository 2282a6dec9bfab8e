"""python -m vit_hf.demo: a real headless Chromium uploads a photo and reads the top class on the page; gradio_client
calls its /predict; the rollout for an ONNX folder comes from --attention-model; a taken port is one line."""

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import free_port, in_ci, offline_env, one_line_error
from transformers import AutoImageProcessor, ViTForImageClassification
from transformers.image_utils import load_image

from serving.material import CIFAR10_CLASSES
from vit_hf.demo import main
from vit_hf.serving.backends import load_backend
from vit_hf.serving.demo_app import make_predict, rollout_model
from vit_hf.serving.preprocess import Preprocessing
from vit_hf.utils.errors import UserError

pytestmark = pytest.mark.slow  # a Gradio server starts in its own process
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def _expected_scores(model_dir: Path, path: Path) -> dict[str, float]:
    """The softmax of the PyTorch model's logits for the image, through transformers' own processor."""
    pixels = AutoImageProcessor.from_pretrained(model_dir)(load_image(str(path)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = ViTForImageClassification.from_pretrained(model_dir)(pixels).logits.softmax(-1)[0]
    return {CIFAR10_CLASSES[i]: float(p) for i, p in enumerate(probabilities)}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The demo of model_dir, served by `python -m vit_hf.demo` on a free port; its URL once it answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "vit_hf.demo", str(model_dir), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=offline_env() | {"GRADIO_ANALYTICS_ENABLED": "False"},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            if process.poll() is not None:
                pytest.fail(f"the demo exited with code {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the demo did not answer at {url} within 5 minutes:\n{log.read_text()}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _browser():
    """A headless Chromium driven by selenium; where there is none, a skip saying why, or in CI a failure."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        why = f"no browser to drive: {', '.join(missing)} missing (apt-get install chromium chromium-driver)"
        if in_ci():
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the page's network requests
    return webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)


def test_a_browser_uploads_a_photo_and_reads_the_top_class(server, model_dir, cifar_jpegs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = sorted(cifar_jpegs.glob("*.jpg"))[3]
    expected = _expected_scores(model_dir, photo)
    driver = _browser()
    try:
        driver.get(server)
        upload = WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))
        upload[0].send_keys(str(photo))
        shown = WebDriverWait(driver, 120).until(
            lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=label-output-value]") if e.text]
        )
        requests = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    finally:
        driver.quit()

    assert shown == [max(expected, key=expected.get)]
    urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
    web = {url for url in urls if url.startswith(("http:", "https:", "ws:", "wss:"))}
    assert web and all(url.startswith(server) for url in web), sorted(web)  # nothing fetched from outside


def test_gradio_client_calls_predict(server, model_dir, cifar_jpegs):
    from gradio_client import Client, handle_file

    photo = sorted(cifar_jpegs.glob("*.jpg"))[7]
    expected = _expected_scores(model_dir, photo)

    classes, rollout = Client(server, verbose=False).predict(handle_file(str(photo)), api_name="/predict")

    top5 = sorted(expected, key=expected.get, reverse=True)[:5]
    assert classes["label"] == top5[0]
    assert [c["label"] for c in classes["confidences"]] == top5
    np.testing.assert_allclose(
        [c["confidence"] for c in classes["confidences"]], [expected[c] for c in top5], atol=1e-5
    )
    assert Path(rollout).is_file()  # the rollout over the photo, as an image file the client downloaded


def test_an_onnx_folder_draws_its_rollout_with_the_pytorch_folder_it_names(onnx_dir, model_dir, cifar_jpegs):
    backend, preprocessing = load_backend(onnx_dir), Preprocessing.from_folder(onnx_dir)
    photo = load_image(str(sorted(cifar_jpegs.glob("*.jpg"))[0]))

    classes, rollout = make_predict(backend, preprocessing, rollout_model(backend, model_dir))(photo)
    alone, no_rollout = make_predict(backend, preprocessing, rollout_model(backend, None))(photo)

    assert len(classes) == 5 and classes == alone
    assert rollout.shape == (32, 64, 3) and rollout.dtype == np.uint8  # the photo and its heat map, side by side
    assert no_rollout is None


def test_an_attention_model_of_other_classes_is_refused(onnx_dir, model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"id2label": dict(enumerate(reversed(CIFAR10_CLASSES)))}))

    with pytest.raises(UserError, match=f"^--attention-model {other}: its classes or image size"):
        rollout_model(load_backend(onnx_dir), other)


def test_a_port_in_use_is_one_line(model_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        error = one_line_error(main, [str(model_dir), "--port", str(port)], capsys)

    assert error == f"error: --port {port}: 127.0.0.1:{port} is already in use\n"


def test_a_folder_that_is_not_a_model_is_one_line(tmp_path, capsys):
    error = one_line_error(main, [str(tmp_path), "--port", str(free_port())], capsys)

    assert (
        error
        == f"error: {tmp_path}: not a model folder (no config.json, preprocessor_config.json, model.safetensors)\n"
    )
