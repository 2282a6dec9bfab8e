"""`data.streaming: true`: the shared CIFAR-10 parquet cut into shards and read as a stream, split across processes
and workers with every row read once, resumed exactly from its state, minival and test counted once; the reference
is the shards themselves, read with pyarrow and PIL."""

import http.server
import io
import json
import shutil
import tarfile
import textwrap
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from launch import run_module
from photos import BROKEN, CLASSES, SPLIT_SIZES, photo_recipe, write_photo_folder
from PIL import Image, ImageOps
from runs import assert_same_weights, losses, tiny_recipe, weights, write_recipe

from vit_hf.data.sources import load_splits
from vit_hf.data.stream_loader import SHARD_ROWS, StreamLoader, make_stream_loader
from vit_hf.recipe import resolve_recipe
from vit_hf.utils.errors import RunError, UserError

# Uneven shards, several row groups each: 6 shards over 2 processes x 2 workers leave lanes of 2, 2, 1 and 1 shards.
TRAIN_SHARDS = (130, 70, 100, 150, 50, 100)
TEST_SHARDS = (60, 50, 40)  # 3 shards for 2 processes: one lane each, of 2 shards and 1


def cut(parquet: Path, sizes: tuple[int, ...], folder: Path, start: int = 0) -> list[Path]:
    """Rows start.. of PARQUET cut into shards of SIZES rows (row groups of 32)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(parquet)
    paths, offset = [], start
    for i, size in enumerate(sizes):
        path = folder / f"shard_{i:02d}.parquet"
        pq.write_table(table.slice(offset, size), path, row_group_size=32)
        paths.append(path)
        offset += size
    return paths


def reference(paths: list[Path]) -> dict[int, tuple[int, np.ndarray]]:
    """Row index (shard * 10**9 + row) -> (label, RGB pixels) of every row of the shards, read with pyarrow and PIL."""
    rows = {}
    for shard, path in enumerate(paths):
        table = pq.read_table(path).to_pydict()
        for row, (image, label) in enumerate(zip(table["img"], table["label"], strict=True)):
            rows[shard * SHARD_ROWS + row] = (label, np.asarray(Image.open(io.BytesIO(image["bytes"])).convert("RGB")))
    return rows


@pytest.fixture(scope="module")
def shards(cifar10_dir, tmp_path_factory) -> dict[str, list[Path]]:
    folder = tmp_path_factory.mktemp("shards")
    return {
        "train": cut(cifar10_dir / "train.parquet", TRAIN_SHARDS, folder / "train"),
        "test": cut(cifar10_dir / "test.parquet", TEST_SHARDS, folder / "test"),
    }


def stream_data(shards: dict, **fields) -> dict:
    files = {split: [str(path) for path in paths] for split, paths in shards.items()}
    return {
        "dataset": {"path": "parquet", "data_files": files},
        "train_split": "train[100:]",
        "eval_split": "train[:100]",
        "test_split": "test",
        "streaming": True,
    } | fields


def loader(split, splits, process=0, processes=1, workers=2, **kwargs) -> StreamLoader:
    options = {"shuffle": True, "seed": 7, "shuffle_buffer": 48, "num_workers": workers} | kwargs
    columns = splits.image_column, splits.label_column, len(splits.class_names)
    return make_stream_loader(split, *columns, 16, process_index=process, num_processes=processes, **options)


def read_epoch(stream: StreamLoader) -> list[dict]:
    return [{key: batch[key] for key in ("index", "labels", "pixels")} for batch in stream]


def epoch_indices(split, splits, processes: int, workers: int = 2) -> list[int]:
    """The row indices of one epoch read by each of PROCESSES processes in turn."""
    streams = [loader(split, splits, process, processes, workers) for process in range(processes)]
    return [index for stream in streams for batch in read_epoch(stream) for index in batch["index"].tolist()]


def test_every_row_is_read_once_by_2_processes_x_2_workers_with_the_labels_and_pixels_of_the_parquet(shards):
    splits = load_splits(stream_data(shards), streaming_ok=True)
    rows = reference(shards["train"])
    seen = []
    for process in range(2):
        for batch in read_epoch(loader(splits.train, splits, process, 2)):
            for index, label, pixels in zip(batch["index"].tolist(), batch["labels"], batch["pixels"], strict=True):
                assert rows[index][0] == label
                np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), rows[index][1])
                seen.append(index)
    # train[:100] is the first 17 rows of shards 0-3 and 16 of shards 4-5; train[100:] every other row, once.
    minival = {shard * SHARD_ROWS + row for shard, quota in enumerate([17] * 4 + [16] * 2) for row in range(quota)}
    assert len(seen) == len(set(seen)) == sum(TRAIN_SHARDS) - 100
    assert set(seen) == set(rows) - minival
    assert sorted(epoch_indices(splits.eval, splits, 2)) == sorted(minival)


@pytest.mark.parametrize("sizes, workers", [((40, 30, 50, 20, 60), 2), ((90,), 2), ((40, 50), 0)])
def test_shards_not_divisible_by_the_lanes_still_give_every_row_once(cifar10_dir, tmp_path, sizes, workers):
    # 5 shards for 2 x 2 lanes (one lane reads 2), 1 shard for 2 processes (split by example), no workers at all.
    paths = cut(cifar10_dir / "train.parquet", sizes, tmp_path)
    data = stream_data({"train": paths}, train_split="train", eval_split=None, test_split=None)
    splits = load_splits(data, streaming_ok=True)
    seen = epoch_indices(splits.train, splits, 2, workers)
    assert len(seen) == len(set(seen)) == sum(sizes)
    assert set(seen) == {s * SHARD_ROWS + r for s, size in enumerate(sizes) for r in range(size)}


def test_epochs_reshuffle_and_a_stream_resumed_from_its_state_continues_the_unbroken_sequence(shards):
    splits = load_splits(stream_data(shards), streaming_ok=True)

    def sequence(stream: StreamLoader, epochs: int) -> list[list[int]]:
        out = []
        while stream.epoch < epochs:
            out += [batch["index"].tolist() for batch in stream]
        return out

    for process in range(2):  # each of 2 processes x 2 workers in turn
        stream = loader(splits.train, splits, process, 2)
        unbroken = sequence(stream, 1)
        epoch_0 = len(unbroken)
        unbroken += sequence(stream, 2)
        assert sorted(sum(unbroken[:epoch_0], [])) == sorted(sum(unbroken[epoch_0:], []))  # one pass each
        assert unbroken[:epoch_0] != unbroken[epoch_0:]  # in another order
        for stop in (1, epoch_0, epoch_0 + 3):  # mid-block of the first lane, at the epoch's end, in epoch 2
            broken = loader(splits.train, splits, process, 2)
            batches = broken.endless()
            first = [next(batches)["index"].tolist() for _ in range(stop)]
            # Every process's state, as `state_dict` gathers it in a real job (here both slots are this process's).
            saved = {"processes": json.loads(json.dumps(broken.state_dict()))["processes"] * 2}
            resumed = loader(splits.train, splits, process, 2)
            resumed.load_state_dict(saved)
            assert first + sequence(resumed, 2) == unbroken, (process, stop)


def test_resuming_a_stream_on_other_workers_is_refused_in_one_line(shards):
    splits = load_splits(stream_data(shards), streaming_ok=True)
    stream = loader(splits.train, splits, 0, 1, workers=2)
    next(iter(stream))
    saved = stream.state_dict()
    with pytest.raises(UserError, match=r"read by 1 process x 2 lanes and would be by 1 process x 1 lane") as error:
        loader(splits.train, splits, 0, 1, workers=1).load_state_dict(saved)
    assert "\n" not in str(error.value)


def test_bad_stream_recipes_and_splits_are_one_line_errors_naming_the_field(shards, tmp_path):
    base = tiny_recipe(Path("."), tmp_path, data=stream_data(shards))
    resolve_recipe(base)  # names and absolute rows stream
    cases = {
        "data.train_split": {"train_split": "train[:98%]"},
        "data.eval_split": {"eval_split": "train[-100:]"},
        "data.examples_per_class": {"examples_per_class": 4},
        "data.shuffle_buffer": {"shuffle_buffer": 0},
    }
    for field, change in cases.items():
        with pytest.raises(UserError, match=rf"^{field}") as error:
            resolve_recipe(base | {"data": base["data"] | change})
        assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"^data.streaming: this command reads whole splits"):
        load_splits(stream_data(shards))  # a tool that is not the loop
    with pytest.raises(UserError, match="no split 'validation'"):
        load_splits(stream_data(shards, eval_split="validation"), streaming_ok=True)


def test_a_label_outside_the_classes_stops_the_stream_naming_its_shard_and_row(cifar10_dir, tmp_path):
    path = cut(cifar10_dir / "train.parquet", (20,), tmp_path)[0]
    table = pq.read_table(path)
    labels = table["label"].to_pylist()
    labels[13] = 12
    pq.write_table(table.set_column(1, "label", [labels]).replace_schema_metadata(table.schema.metadata), path)
    data = stream_data({"train": [path]}, train_split="train", eval_split=None, test_split=None)
    splits = load_splits(data, streaming_ok=True)
    with pytest.raises(UserError, match=r"row 13 of shard 0 has label 12 in column 'label', outside 0..9"):
        for batch in loader(splits.train, splits, workers=1, shuffle=False):
            batch["pixels"]


# --- real processes -----------------------------------------------------------------------------------------------

PROBE = """
import json, sys
from accelerate import PartialState
from vit_hf.data.sources import load_splits
from vit_hf.data.stream_loader import make_stream_loader

state = PartialState(cpu=True)
data, out = json.loads(sys.argv[1]), sys.argv[2]
splits = load_splits(data, streaming_ok=True)


def stream(split, **kwargs):
    return make_stream_loader(split, splits.image_column, splits.label_column, 10, 16, seed=5, num_workers=2,
                              shuffle_buffer=48, process_index=state.process_index,
                              num_processes=state.num_processes, **kwargs)


def sequence(loader, epochs):
    batches = []
    while loader.epoch < epochs:
        batches += [batch["index"].tolist() for batch in loader]
    return batches


unbroken = sequence(stream(splits.train, shuffle=True), 2)
broken = stream(splits.train, shuffle=True)
batches = broken.endless()
first = [next(batches)["index"].tolist() for _ in range(7)]
saved = broken.state_dict()  # every process's, gathered
resumed = stream(splits.train, shuffle=True)
resumed.load_state_dict(saved)
test = [batch["index"].tolist() for batch in stream(splits.test, shuffle=False, even=True)]
result = {"unbroken": unbroken, "resumed": first + sequence(resumed, 2), "test": test, "saved": len(saved["processes"])}
with open(f"{out}/{state.process_index}.json", "w") as file:
    json.dump(result, file)
"""


@pytest.mark.slow
def test_2_processes_x_2_workers_read_every_row_once_and_resume_mid_epoch_from_the_gathered_state(shards, tmp_path):
    (tmp_path / "stream_probe.py").write_text(textwrap.dedent(PROBE))
    data = json.dumps(stream_data(shards))
    result = run_module("stream_probe", [data, str(tmp_path)], processes=2, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for rank in ranks:
        assert rank["resumed"] == rank["unbroken"]  # mid-epoch 1, resumed from the state both processes saved
        assert rank["saved"] == 2
    epochs = [sum(rank["unbroken"], []) for rank in ranks]
    train = {s * SHARD_ROWS + r for s, size in enumerate(TRAIN_SHARDS) for r in range(size)}
    minival = {s * SHARD_ROWS + r for s, quota in enumerate([17] * 4 + [16] * 2) for r in range(quota)}
    read = epochs[0] + epochs[1]
    assert len(read) == 2 * len(train - minival) and set(read) == train - minival  # each row once an epoch
    test = [i for rank in ranks for batch in rank["test"] for i in batch if i >= 0]
    assert len(test) == len(set(test)) == sum(TEST_SHARDS)
    assert len(ranks[0]["test"]) == len(ranks[1]["test"])  # the shorter part padded: as many forward passes


STREAMED = {
    "train": {"global_batch_size": 32, "micro_batch_size": 16, "eval_batch_size": 16, "eval_every": 10,
              "save_every": 8, "keep_checkpoints": 5, "log_every": 1, "report_to": []},
    "schedule": {"name": "cosine", "warmup_steps": 2, "total_steps": 20},
}  # fmt: skip


@pytest.mark.slow
def test_a_streamed_run_on_2_processes_x_2_workers_resumes_mid_epoch_to_the_unbroken_weights(shards, tmp_path):
    # 500 training rows in lanes of 147, 137, 83 and 133: 19 micro-batches of at most 16 an epoch on process 0, 15
    # on process 1, so the checkpoint after update 8 lies inside epoch 1 and both end in epoch 2. Crops and flips
    # depend on (seed, epoch, row).
    data = stream_data(shards, num_workers=2, augment={"crop_scale": [0.5, 1.0], "hflip": True})
    unbroken = tmp_path / "unbroken"
    with_pictures = STREAMED | {"train": STREAMED["train"] | {"report_to": ["tensorboard"]}}
    recipe = write_recipe(tmp_path, tiny_recipe(Path("."), unbroken, data=data, **with_pictures), "a.json")
    result = run_module("vit_hf.finetune", [str(recipe)], processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not draw" not in result.stderr  # the pictures read the streamed test split too
    results = json.loads((unbroken / "results.json").read_text())
    assert (results["eval_samples"], results["test_samples"]) == (100, sum(TEST_SHARDS))  # each sample once
    progress = torch.load(unbroken / "checkpoints" / "step_8" / "custom_checkpoint_0.pkl", weights_only=True)
    assert (progress["epoch"], progress["epoch_samples"]) == (0, 0)  # a stream has no length
    stream = torch.load(unbroken / "checkpoints" / "step_8" / "custom_checkpoint_1.pkl", weights_only=True)
    assert [len(process["lanes"]) for process in stream["processes"]] == [2, 2]  # both processes, 2 lanes each

    resumed = tmp_path / "resumed"
    shutil.copytree(unbroken / "checkpoints" / "step_8", resumed / "checkpoints" / "step_8")
    recipe = write_recipe(tmp_path, tiny_recipe(Path("."), resumed, data=data, **STREAMED), "b.json")
    result = run_module("vit_hf.finetune", [str(recipe), "--resume", "auto"], processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(resumed) == pytest.approx(losses(unbroken)[8:], abs=1e-6)
    assert_same_weights(weights(resumed / "checkpoints" / "step_20"), weights(unbroken / "checkpoints" / "step_20"), 0)
    assert json.loads((resumed / "results.json").read_text())["test_samples"] == sum(TEST_SHARDS)


# --- folders of photos and webdataset shards ------------------------------------------------------------------------
# datasets streams an imagefolder as one shard in path order (sorted by class); vit_hf deals its files into shards.
# A webdataset's class is an integer .cls file: its names come from data.class_names. The references are the files
# themselves, read with PIL, the folder names and tarfile.


def upright_32(path: Path) -> np.ndarray:
    """The eval input of a photo, as PIL makes it: upright, RGB, the whole image resized to 32 x 32 (bilinear)."""
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB").resize((32, 32), Image.BILINEAR))


def folder_data(folder: Path, **fields) -> dict:
    source = {"path": "imagefolder", "data_dir": str(folder)}
    return {"dataset": source, "train_split": "train", "eval_split": "validation", "test_split": "test",
            "streaming": True, "bad_images": "skip"} | fields  # fmt: skip


def test_a_streamed_photo_folder_is_dealt_into_shards_each_photo_read_once_with_its_folders_label(
    cifar10_dir, tmp_path
):
    folder = write_photo_folder(tmp_path / "photos", cifar10_dir, broken=True)
    (folder / "train" / "notes.txt").write_text("not an image: imagefolder ignores it, and so does the stream")
    splits = load_splits(folder_data(folder), streaming_ok=True)
    photos = sorted(path for path in (folder / "train").rglob("*.*") if path.suffix != ".txt")
    assert splits.class_names == sorted(CLASSES) and splits.train.num_shards == len(photos) == 16
    references = {path: upright_32(path) for path in photos if path != folder / BROKEN}

    matched, skipped, lanes = [], 0, set()
    for process in range(2):
        stream = loader(splits.train, splits, process, 2, workers=2, shuffle=False, image_size=32, bad_images="skip")
        for batch in stream:
            skipped += int(batch["skipped"])
            lanes |= {(process, lane) for lane in stream.lanes}
            for pixels, label in zip(batch["pixels"], batch["labels"].tolist(), strict=True):
                ours = pixels.permute(1, 2, 0).numpy().astype(int)
                path = min(references, key=lambda p: np.abs(references[p] - ours).mean())
                # The eval resize of PIL's full decode, within the DCT scaling of JPEGs drafted to 1/2 or 1/4 (as
                # tests/test_data.py states it for small outputs).
                difference = np.abs(references[path] - ours)
                assert difference.mean() < 1 and difference.max() <= 20
                assert splits.class_names[label] == path.parent.name
                matched.append(path)
    assert sorted(matched) == sorted(references) and skipped == 1  # every photo once, the broken file counted
    assert len(lanes) == 4  # 2 processes x 2 workers, each reading shards of its own

    # train[:6] is the first row of 6 shards: the same photos on every load (the deal is fixed, not train.seed's).
    picks = []
    for _ in range(2):
        part = load_splits(folder_data(folder, train_split="train[:6]"), streaming_ok=True)
        batches = list(loader(part.train, part, workers=0, shuffle=False, image_size=32, bad_images="skip"))
        picks.append((torch.cat([b["pixels"] for b in batches]), sum(int(b["skipped"]) for b in batches)))
    assert torch.equal(picks[0][0], picks[1][0]) and len(picks[0][0]) + picks[0][1] == 6


def write_webdataset(cifar10_dir: Path, folder: Path, sizes: tuple[int, ...]) -> list[list[tuple[int, bytes]]]:
    """CIFAR-10 test images as webdataset tar shards of SIZES samples (KEY.jpg and KEY.cls); each shard's
    (label, JPEG bytes) in order."""
    rows = pq.read_table(cifar10_dir / "test.parquet").slice(0, sum(sizes)).to_pylist()
    folder.mkdir(parents=True, exist_ok=True)
    shards, offset = [], 0
    for number, size in enumerate(sizes):
        samples = [(row["label"], row["img"]["bytes"]) for row in rows[offset : offset + size]]
        with tarfile.open(folder / f"train-{number:05d}.tar", "w") as tar:
            for i, (label, jpeg) in enumerate(samples):
                for extension, payload in (("jpg", jpeg), ("cls", str(label).encode())):
                    member = tarfile.TarInfo(f"{offset + i:06d}.{extension}")
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
        shards.append(samples)
        offset += size
    return shards


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_a_broken_webdataset_member_is_named_with_its_split_shard_and_row(cifar10_dir, tmp_path):
    write_webdataset(cifar10_dir, tmp_path / "wds", (3, 3))
    shard = tmp_path / "wds" / "train-00001.tar"
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:  # the shard again, its second image (000004.jpg) no JPEG
        for member, payload in members:
            payload = b"not a JPEG" if member.name == "000004.jpg" else payload
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    source = {"path": "webdataset", "data_files": {"train": str(tmp_path / "wds" / "*.tar")}}
    data = {"dataset": source, "train_split": "train[1:]", "eval_split": None, "test_split": None,
            "streaming": True, "class_names": CIFAR10_NAMES}  # fmt: skip
    splits = load_splits(data, streaming_ok=True)
    batch = next(iter(loader(splits.train, splits, workers=0, shuffle=False)))
    with pytest.raises(UserError) as error:
        batch["pixels"]
    assert str(error.value).startswith(
        "undecodable image 000004.jpg (split 'train[1:]', shard 1, row 1), column 'jpg': "
    ), error.value
    skipped = next(iter(loader(splits.train, splits, workers=0, shuffle=False, bad_images="skip")))
    assert skipped["skipped_rows"].tolist() == [SHARD_ROWS + 1] and skipped["skipped"].item() == 1


def test_webdataset_shards_stream_with_the_class_names_of_the_recipe(cifar10_dir, tmp_path):
    shards = write_webdataset(cifar10_dir, tmp_path / "wds", (30, 20, 25))
    source = {"path": "webdataset", "data_files": {"train": str(tmp_path / "wds" / "*.tar")}}
    data = {"dataset": source, "train_split": "train[9:]", "eval_split": "train[:9]", "test_split": None,
            "streaming": True}  # fmt: skip
    with pytest.raises(UserError, match=r"^data.class_names: column 'cls' of the stream of .* list them") as error:
        load_splits(data, streaming_ok=True)
    assert "\n" not in str(error.value)

    splits = load_splits(data | {"class_names": CIFAR10_NAMES}, streaming_ok=True)
    assert (splits.image_column, splits.label_column, splits.class_names) == ("jpg", "cls", CIFAR10_NAMES)
    seen = {}
    for split in (splits.train, splits.eval):
        for batch in loader(split, splits, workers=2, shuffle=False):
            for index, label, pixels in zip(batch["index"].tolist(), batch["labels"], batch["pixels"], strict=True):
                seen[index] = (int(label), pixels.permute(1, 2, 0).numpy())
    assert len(seen) == sum(map(len, shards))
    for index, (label, pixels) in seen.items():
        expected_label, jpeg = shards[index // SHARD_ROWS][index % SHARD_ROWS]
        assert label == expected_label
        np.testing.assert_array_equal(pixels, np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))

    with pytest.raises(UserError, match=r"row \d+ of shard \d+ has label \d in column 'cls', outside 0..2"):
        few = load_splits(data | {"class_names": ["a", "b", "c"]}, streaming_ok=True)
        for batch in loader(few.train, few, workers=0, shuffle=False):
            batch["pixels"]


@pytest.mark.slow
def test_a_streamed_photo_folder_and_webdataset_shards_train_end_to_end(cifar10_dir, tmp_path):
    photos = write_photo_folder(tmp_path / "photos", cifar10_dir, broken=True)
    out = tmp_path / "folder"
    recipe = photo_recipe(cifar10_dir, photos, out, streaming=True, num_workers=2)
    result = run_module("vit_hf.finetune", [str(write_recipe(tmp_path, recipe, "folder.json"))])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not draw" not in result.stderr  # the end-of-run pictures read the streamed photos too
    results = json.loads((out / "results.json").read_text())
    assert (results["eval_samples"], results["test_samples"]) == (SPLIT_SIZES["validation"], SPLIT_SIZES["test"])
    assert results["skipped_images"] == 1 and (out / "README.md").is_file()  # the broken file, counted once
    assert list(json.loads((out / "config.json").read_text())["id2label"].values()) == sorted(CLASSES)

    write_webdataset(cifar10_dir, tmp_path / "wds", (40, 30, 30))
    out = tmp_path / "wds_out"
    source = {"path": "webdataset", "data_files": {"train": str(tmp_path / "wds" / "*.tar")}}
    data = {"dataset": source, "train_split": "train[12:]", "eval_split": "train[:12]", "test_split": None,
            "streaming": True, "num_workers": 2, "class_names": CIFAR10_NAMES}  # fmt: skip
    result = run_module(
        "vit_hf.finetune", [str(write_recipe(tmp_path, tiny_recipe(Path("."), out, data=data), "w.json"))]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["eval_samples"] == 12
    assert list(json.loads((out / "config.json").read_text())["id2label"].values()) == CIFAR10_NAMES


@pytest.fixture
def served(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (a stand-in for remote shards); yields (folder, base URL, paths got,
    the paths of the GET requests, {path: GETs served before it is answered 404}: a shard that goes away)."""
    folder, got, gets, gone = tmp_path / "served", [], [], {}
    folder.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):  # noqa: N802 (the http.server API)
            gets.append(self.path)
            if gone.get(self.path, 1) <= 0:
                self.send_error(404)
                return
            if self.path in gone:
                gone[self.path] -= 1
            super().do_GET()

        def log_message(self, format, *args):  # noqa: A002 (the http.server API)
            got.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}", got, gets, gone
    httpd.shutdown()
    thread.join()


@pytest.mark.slow
def test_webdataset_shards_over_http_stream_on_2_processes_x_2_workers_and_resume_without_a_local_copy(
    cifar10_dir, served, tmp_path
):
    folder, url, got, _, _ = served
    train = write_webdataset(cifar10_dir, folder / "train", (40, 25, 35, 30, 20))
    test = write_webdataset(cifar10_dir, folder / "test", (20, 15))
    files = {split: [f"{url}/{split}/train-{i:05d}.tar" for i in range(len(shards))] for split, shards in
             (("train", train), ("test", test))}  # fmt: skip
    data = {"dataset": {"path": "webdataset", "data_files": files}, "train_split": "train[10:]", "eval_split": None,
            "test_split": "test", "streaming": True, "class_names": CIFAR10_NAMES}  # fmt: skip
    (tmp_path / "stream_probe.py").write_text(textwrap.dedent(PROBE))
    cache = tmp_path / "hf_cache"
    env = {"PYTHONPATH": str(tmp_path), "HF_HOME": str(cache), "HF_DATASETS_CACHE": str(cache / "datasets")}
    result = run_module("stream_probe", [json.dumps(data), str(tmp_path)], processes=2, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert all(rank["resumed"] == rank["unbroken"] for rank in ranks)  # resumed mid-epoch from the gathered state
    rows = {s * SHARD_ROWS + r for s, shard in enumerate(train) for r in range(len(shard))}
    minival = {s * SHARD_ROWS + r for s in range(len(train)) for r in range(2)}  # train[:10]: 2 rows of each shard
    read = [i for rank in ranks for batch in rank["unbroken"] for i in batch]  # 2 epochs
    assert len(read) == 2 * len(rows - minival) and set(read) == rows - minival  # each row once an epoch
    tested = [i for rank in ranks for batch in rank["test"] for i in batch if i >= 0]
    assert len(tested) == len(set(tested)) == sum(map(len, test))
    assert {path.rsplit("/", 1)[-1] for path in got} >= {f"train-{i:05d}.tar" for i in range(len(train))}
    copies = [path for path in cache.rglob("*") if path.is_file() and path.stat().st_size > 10_000]
    assert copies == []  # streamed: no shard was downloaded into the cache


def test_zipped_photo_folders_are_refused_in_one_line_and_metadata_folders_stream_with_a_warning(
    cifar10_dir, tmp_path, caplog
):
    # datasets 5.2 labels the images of an archive by the archive's own folder ("train"): refused, not mislabelled.
    folder = write_photo_folder(tmp_path / "photos", cifar10_dir, broken=False)
    zipped = tmp_path / "zipped"
    (zipped / "train").mkdir(parents=True)
    shutil.make_archive(str(zipped / "train" / "photos"), "zip", folder / "train")
    with pytest.raises(UserError, match=r"^data.dataset: split 'train' holds zip archives \(photos.zip\)") as error:
        load_splits(folder_data(zipped, eval_split=None, test_split=None), streaming_ok=True)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="datasets could not read it: Invalid string class label train"):
        load_splits(folder_data(zipped, eval_split=None, test_split=None, streaming=False))

    listed = tmp_path / "listed" / "train"  # labels from a metadata file: datasets' own one-shard stream
    listed.mkdir(parents=True)
    photos = sorted((folder / "train").rglob("*.png"))
    for i, photo in enumerate(photos):
        shutil.copy(photo, listed / f"{i}.png")
    (listed / "metadata.csv").write_text(
        "file_name,label\n" + "".join(f"{i}.png,{i % 3}\n" for i in range(len(photos)))
    )
    with caplog.at_level("WARNING", logger="vit_hf.data.streaming"):
        data = folder_data(listed.parent, eval_split=None, test_split=None, class_names=["a", "b", "c"])
        splits = load_splits(data, streaming_ok=True)
    assert splits.train.num_shards == 1 and any("one shard, in file order" in r.getMessage() for r in caplog.records)
    batches = list(loader(splits.train, splits, workers=0, shuffle=False, image_size=32))
    assert sorted(i for b in batches for i in b["labels"].tolist()) == sorted(i % 3 for i in range(len(photos)))


def test_a_shard_that_cannot_be_read_mid_stream_stops_with_one_line_naming_it(cifar10_dir, served, tmp_path):
    folder, url, _, gets, gone = served
    write_webdataset(cifar10_dir, folder, (20, 20, 20))
    files = [f"{url}/train-{i:05d}.tar" for i in range(3)]
    data = {"dataset": {"path": "webdataset", "data_files": {"train": files}}, "train_split": "train",
            "eval_split": None, "test_split": None, "streaming": True, "class_names": CIFAR10_NAMES}  # fmt: skip
    splits = load_splits(data, streaming_ok=True)
    gets_to_open = gets.count("/train-00001.tar")  # what opening the stream reads of it
    gone["/train-00001.tar"] = 0  # after the stream opened: the source is gone, or the network
    for workers in (0, 2):
        with pytest.raises(RunError, match=r"^data.train_split: cannot read shard 1: FileNotFoundError: http") as error:
            for batch in loader(splits.train, splits, workers=workers, shuffle=False):
                batch["pixels"]
        assert "\n" not in str(error.value) and "--resume auto" in str(error.value)

    # The loop: exit code 1, one error line, no traceback.
    gone["/train-00001.tar"] = gets_to_open
    recipe = tiny_recipe(Path("."), tmp_path / "out", data=data | {"num_workers": 2, "train_split": "train[8:]",
                                                                    "eval_split": "train[:8]"})  # fmt: skip
    result = run_module("vit_hf.finetune", [str(write_recipe(tmp_path, recipe, "gone.json"))])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "cannot read shard 1" in errors[0]
