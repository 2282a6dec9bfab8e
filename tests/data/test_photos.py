"""Folders of photos of any size, aspect ratio, mode and format: through the loop's CLI, on one and two processes.

The photos are real CIFAR-10 test images (read with pyarrow and PIL), enlarged and saved by PIL as an imagefolder.
"""

import io
import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from launch import run_module
from photos import BROKEN, CLASSES, SPLIT_SIZES, photo_recipe, write_photo_folder
from PIL import ExifTags, Image, ImageOps
from pil_resize import assert_resized_as_pil
from runs import losses, run_here, write_recipe
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import pipeline
from transformers.image_utils import load_image as transformers_load_image

import vit_hf.data.batches as batches_module
from vit_hf.data.images import load_image as predict_load_image
from vit_hf.data.loader import make_loader


@pytest.fixture(scope="module")
def photos(cifar10_dir, tmp_path_factory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("photos"), cifar10_dir, broken=True)


@pytest.fixture(scope="module")
def clean_photos(cifar10_dir, tmp_path_factory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("clean_photos"), cifar10_dir, broken=False)


def finetune(tmp_path: Path, recipe: dict, processes: int = 1):
    return run_module("vit_hf.finetune", [str(write_recipe(tmp_path, recipe))], processes=processes)


@pytest.mark.slow
def test_a_folder_of_mixed_photos_trains_end_to_end_and_serves_its_folder_names(cifar10_dir, photos, tmp_path):
    out = tmp_path / "out"
    result = finetune(tmp_path, photo_recipe(cifar10_dir, photos, out))
    assert result.returncode == 0, result.stderr[-3000:]

    assert (out / "README.md").is_file() and (out / "training_curves.png").is_file()
    # The pictures of the end of the run (TensorBoard, the default tracker): the predictions and 4 rollouts.
    assert "could not draw" not in result.stderr
    events = EventAccumulator(str(next((out / "runs").rglob("events.out.tfevents.*")).parent)).Reload()
    pictures = {tag: events.Images(tag)[0] for tag in events.Tags()["images"]}
    assert sorted(pictures) == ["test/attention_rollout_0", "test/attention_rollout_1", "test/attention_rollout_2",
                                "test/attention_rollout_3", "test/predictions"]  # fmt: skip
    assert (pictures["test/attention_rollout_0"].width, pictures["test/attention_rollout_0"].height) == (64, 32)
    results = json.loads((out / "results.json").read_text())
    assert results["eval_samples"] == SPLIT_SIZES["validation"] and results["test_samples"] == SPLIT_SIZES["test"]
    assert results["skipped_images"] == 1  # the broken file, read in each of the 2 epochs, counted once
    assert results["class_names"] == list(CLASSES)
    classifier = pipeline("image-classification", model=str(out))
    predictions = classifier(Image.open(sorted((photos / "test" / "ship").iterdir())[0]).convert("RGB"), top_k=3)
    assert sorted(p["label"] for p in predictions) == sorted(CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_undecodable_photo_stops_the_run_with_one_line_naming_its_file(cifar10_dir, photos, tmp_path, num_workers):
    recipe = photo_recipe(cifar10_dir, photos, tmp_path / "out", bad_images="stop", num_workers=num_workers)
    result = finetune(tmp_path, recipe)

    assert result.returncode == 2
    # The row of the broken file, as datasets itself lists the folder.
    files = datasets.load_dataset("imagefolder", data_dir=str(photos), split="train", cache_dir=str(tmp_path / "c"))
    paths = [Path(image["path"]) for image in files.cast_column("image", datasets.Image(decode=False))["image"]]
    row = paths.index(photos / BROKEN)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    where = re.escape(f"{photos / BROKEN} (split 'train', row {row})")
    pattern = rf"error: undecodable image {where}, column 'image': .+ \(bad_images: \"skip\" drops such rows\)"
    assert re.fullmatch(pattern, errors[0]), errors[0]


def twice_broken_recipe(cifar10_dir: Path, root: Path, out: Path) -> dict:
    """5 epochs of 10 updates of 8 on a photo folder of 16 training rows, 2 of them broken files: each read 5 times."""
    folder = write_photo_folder(root, cifar10_dir, broken=True)
    sorted((folder / "train" / "cat").iterdir())[0].write_bytes(b"not a photo either")  # in place of a photo
    recipe = photo_recipe(cifar10_dir, folder, out)
    recipe["train"] |= {"save_every": 4, "keep_checkpoints": 5}
    return recipe | {"schedule": {"name": "cosine", "warmup_steps": 1, "total_steps": 10}}


@pytest.mark.slow
def test_skipped_images_counts_each_broken_file_once_over_epochs_and_a_resume(cifar10_dir, tmp_path):
    unbroken = twice_broken_recipe(cifar10_dir, tmp_path / "photos", tmp_path / "unbroken")
    assert run_here(unbroken)["skipped_images"] == 2
    progress = torch.load(
        tmp_path / "unbroken" / "checkpoints" / "step_4" / "custom_checkpoint_0.pkl", weights_only=True
    )
    assert progress["skipped_images"] == 2 and len(progress["skipped_rows"]) == 2  # after 2 epochs
    # Resumed at step 4: the 3 epochs left read the same files, already counted.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "unbroken" / "checkpoints" / "step_4", resumed / "checkpoints" / "step_4")
    recipe = unbroken | {"output": {"dir": str(resumed)}}
    assert run_here(recipe, resume="auto")["skipped_images"] == 2


@pytest.mark.slow
def test_two_processes_count_each_broken_file_once(cifar10_dir, tmp_path):
    # Each process reads its own batches: the files are counted once over both, as over the epochs.
    recipe = twice_broken_recipe(cifar10_dir, tmp_path / "photos", tmp_path / "out")
    recipe["train"]["micro_batch_size"] = 4
    result = finetune(tmp_path, recipe, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["num_processes"] == 2 and results["skipped_images"] == 2


@pytest.mark.slow
def test_two_processes_crop_the_photos_as_one_does(cifar10_dir, clean_photos, tmp_path):
    # The crops and flips are drawn in the workers from (seed, epoch, row): whichever process reads a row, it gets
    # the same pixels, so 2 processes x 4 photos give the loss trace of 1 process x 8.
    one, two = tmp_path / "one", tmp_path / "two"
    run_here(photo_recipe(cifar10_dir, clean_photos, one, num_workers=1))  # the reference, in this process
    recipe = photo_recipe(cifar10_dir, clean_photos, two, num_workers=1)
    recipe["train"]["micro_batch_size"] = 4
    result = finetune(tmp_path, recipe, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((two / "results.json").read_text())["num_processes"] == 2
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# EXIF orientation: the loader and predict see a phone photo as datasets' decode and transformers' load_image do,
# upright: the independent reference is PIL's own ImageOps.exif_transpose of the full decode, then PIL's resize.

ORIENTATIONS = range(2, 9)  # 1 is "as stored"; 2-4 flip, 5-8 swap the axes


def asymmetric_pixels(width: int, height: int) -> np.ndarray:
    """Smooth gradients (red across, green down) with an off-centre block: no orientation maps it onto itself."""
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    pixels = np.stack([255 * x, 255 * y, 128 + 100 * np.sin(7 * x + 3 * y)], axis=2)
    pixels[height // 5 : height // 2, width // 8 : width // 3] = (250, 30, 60)
    return pixels.round().astype(np.uint8)


def oriented_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def upright(encoded: bytes) -> Image.Image:
    """The reference: PIL's full decode, then exif_transpose."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(encoded))).convert("RGB")


def jpeg_dataset(jpegs: list[bytes]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["photo"])})
    rows = {"image": [{"bytes": jpeg, "path": None} for jpeg in jpegs], "label": [0] * len(jpegs)}
    return datasets.Dataset.from_dict(rows, features=features)


def batch_of(dataset: datasets.Dataset, **options) -> dict:
    loader = make_loader(dataset, "image", "label", len(dataset), shuffle=False, **options)
    return next(iter(loader))


def hwc(pixels: torch.Tensor) -> np.ndarray:
    return pixels.permute(1, 2, 0).numpy().astype(int)


def assert_close_to_upright(ours: np.ndarray, reference: Image.Image, orientation: int) -> None:
    # Flips (2-4) commute exactly with the resize, which is PIL's within its own rounding (pil_resize); where the
    # axes swap (5-8), the two passes run in the other order and round to uint8 in between: 1 level at most, in
    # a small share of the values of photos and a larger one of these smooth gradients (see batches.Collate._crop).
    assert_resized_as_pil(ours, np.asarray(reference))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_eval_and_fixed_train_boxes_see_the_photo_upright_as_exif_transpose_does(orientation, monkeypatch):
    jpeg = oriented_jpeg(asymmetric_pixels(120, 100), orientation)  # small enough that no draft applies at 64 px
    reference = upright(jpeg)
    dataset = jpeg_dataset([jpeg] * 4)
    # What datasets' own decode gives is the reference: the loader must agree with it.
    assert np.array_equal(np.asarray(dataset[0]["image"].convert("RGB")), np.asarray(reference))

    eval_batch = batch_of(dataset, image_size=64)
    assert eval_batch["prepared"]
    assert_close_to_upright(hwc(eval_batch["pixels"][0]), reference.resize((64, 64), Image.BILINEAR), orientation)

    # Boxes (top, left, height, width) of the upright photo: 100 x 120 or 120 x 100, so these fit either way.
    boxes = [[10, 20, 60, 70], [0, 0, 100, 100], [30, 5, 40, 90], [55, 40, 45, 33]]
    monkeypatch.setattr(batches_module, "crop_boxes", lambda *draws: torch.tensor(boxes, dtype=torch.float32))
    train_batch = batch_of(dataset, image_size=64, crop_scale=(0.05, 1.0))
    for (top, left, height, width), pixels in zip(boxes, train_batch["pixels"], strict=True):
        expected = reference.crop((left, top, left + width, top + height)).resize((64, 64), Image.BILINEAR)
        assert_close_to_upright(hwc(pixels), expected, orientation)


def oriented_png(pixels: np.ndarray, orientation: int, exif_after_pixels: bool = False) -> bytes:
    """A PNG with an EXIF orientation; its eXIf chunk before the IDAT (where Pillow writes it) or after, as the
    format also allows."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", exif=exif)
    png, position, chunks = buffer.getvalue(), 8, []
    while position < len(png):
        length = int.from_bytes(png[position : position + 4], "big")
        chunks.append(png[position : position + 12 + length])
        position += 12 + length
    assert [chunk[4:8] for chunk in chunks] == [b"IHDR", b"eXIf", b"IDAT", b"IEND"]
    header, exif_chunk, pixel_chunk, end = chunks
    return png[:8] + header + (pixel_chunk + exif_chunk if exif_after_pixels else exif_chunk + pixel_chunk) + end


@pytest.mark.parametrize("exif_after_pixels", [False, True])
def test_a_png_is_seen_upright_wherever_its_exif_chunk_lies(exif_after_pixels):
    png = oriented_png(asymmetric_pixels(120, 100), 6, exif_after_pixels)
    # Opening reads the chunks before the pixels only; PIL's own full reading finds the orientation either way.
    assert ("exif" in Image.open(io.BytesIO(png)).info) != exif_after_pixels
    reference = upright(png)
    assert reference.size == (100, 120)
    batch = batch_of(jpeg_dataset([png] * 2), image_size=64)
    assert_close_to_upright(hwc(batch["pixels"][0]), reference.resize((64, 64), Image.BILINEAR), 6)


@pytest.mark.parametrize("orientation", [1, 3, 6, 7])
def test_a_drafted_photo_is_oriented_too(orientation, monkeypatch, jpeg_decoder):
    # 400 x 300 at 64 px: the whole image decodes at 1/4, the train box at 1/2 (photos._draft_scale), in stored pixels.
    jpeg = oriented_jpeg(asymmetric_pixels(400, 300), orientation)
    reference = upright(jpeg)
    dataset = jpeg_dataset([jpeg])
    top, left, height, width = 20, 30, 200, 150
    monkeypatch.setattr(
        batches_module, "crop_boxes", lambda *draws: torch.tensor([[top, left, height, width]], dtype=torch.float32)
    )
    for options, expected in (
        ({}, reference.resize((64, 64), Image.BILINEAR)),
        (
            {"crop_scale": (0.05, 1.0)},
            reference.crop((left, top, left + width, top + height)).resize((64, 64), Image.BILINEAR),
        ),
    ):
        ours = hwc(batch_of(dataset, image_size=64, **options)["pixels"][0])
        difference = np.abs(ours - np.asarray(expected).astype(int))
        # The decoder's DCT scaling (photos._draft_scale): well under a level on average on smooth pixels.
        assert difference.mean() < 1 and difference.max() <= 20


def test_random_crops_and_flips_are_drawn_on_the_upright_photo(monkeypatch):
    # A 160 x 40 photo stored on its side (orientation 6 turns it upright to 40 x 160, tall): every random crop box
    # lies in 40 x 160, so none could have been drawn on the stored 160 x 40; flips mirror the upright crop.
    jpeg = oriented_jpeg(asymmetric_pixels(160, 40), 6)
    reference = upright(jpeg)
    assert reference.size == (40, 160)
    dataset = jpeg_dataset([jpeg] * 16)
    boxes = []
    original = batches_module.crop_boxes

    def spy(*draws):
        boxes.append(original(*draws))
        return boxes[-1]

    monkeypatch.setattr(batches_module, "crop_boxes", spy)
    batch = batch_of(dataset, image_size=32, crop_scale=(0.05, 1.0), hflip=True)
    mirrored = 0
    for (top, left, height, width), pixels in zip(boxes[0].int().tolist(), batch["pixels"], strict=True):
        assert top + height <= 160 and left + width <= 40
        box = (left, top, left + width, top + height)
        expected = np.asarray(reference.crop(box).resize((32, 32), Image.BILINEAR))
        ours = hwc(pixels)
        straight, flipped = np.abs(ours - expected).max(), np.abs(ours - expected[:, ::-1]).max()
        assert min(straight, flipped) <= 1
        mirrored += int(flipped < straight)
    assert 0 < mirrored < 16


def test_small_photos_on_the_device_path_are_upright_exactly():
    # 24 x 24, no larger than image_size: the batch leaves the workers as decoded, oriented (a transpose is exact).
    jpegs = [oriented_jpeg(asymmetric_pixels(24, 24), orientation) for orientation in range(1, 9)]
    batch = batch_of(jpeg_dataset(jpegs), image_size=32)
    assert not batch["prepared"]
    for jpeg, pixels in zip(jpegs, batch["pixels"], strict=True):
        assert np.array_equal(hwc(pixels), np.asarray(upright(jpeg)))
    # Sizes are compared as seen: a 30 x 20 photo on its side is 20 x 30.
    sideways = jpeg_dataset([oriented_jpeg(asymmetric_pixels(30, 20), 8), oriented_jpeg(asymmetric_pixels(20, 30), 1)])
    assert batch_of(sideways)["pixels"].shape == (2, 3, 30, 20)


@pytest.mark.parametrize("orientation", [3, 6])
def test_predict_reads_a_photo_upright_as_the_pipeline_does(orientation, tmp_path):
    path = tmp_path / "phone.jpg"
    path.write_bytes(oriented_jpeg(asymmetric_pixels(50, 30), orientation))
    ours = np.asarray(predict_load_image(path))
    assert np.array_equal(ours, np.asarray(transformers_load_image(str(path))))
    assert np.array_equal(ours, np.asarray(upright(path.read_bytes())))


def test_worker_draws_are_the_row_generators_numbers_in_device_transform_order(monkeypatch):
    # Each row's crop uses its generator's first 20 numbers as the 10 attempts, the next 2 as offsets, then the
    # flip: random_crop_boxes' order, i.e. what DeviceTransform draws for one image from the same generator.
    seen = []
    monkeypatch.setattr(
        batches_module, "crop_boxes", lambda *draws: seen.append(draws) or torch.tensor([[0.0, 0, 30, 40]] * 6)
    )
    dataset = jpeg_dataset([oriented_jpeg(asymmetric_pixels(40, 30), 1)] * 6)
    loader = make_loader(dataset, "image", "label", 6, shuffle=True, seed=11, image_size=16, crop_scale=(0.05, 1.0))
    loader.sampler.set_epoch(2)
    rows = next(iter(loader))["index"].tolist()
    attempts, offsets = seen[0][:2]
    for i, row in enumerate(rows):
        generator = batches_module._row_generator(11, 2, row)
        assert torch.equal(attempts[i], torch.rand(10, 2, generator=generator))
        assert torch.equal(offsets[i], torch.rand(2, generator=generator))
