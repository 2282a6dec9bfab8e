"""Streaming data (`data.streaming: true`): any `datasets.load_dataset` source read as an `IterableDataset`, for data
sets larger than the disk (Hub repos, parquet, imagefolder, webdataset shards).

The design, and why:

- Splits. A stream has no length, so `train[:98%]` cannot be cut. A split is a whole split name (`validation`) or
  absolute rows, `train[:1000]`, `train[1000:]`, `train[500:1500]`, joined with `+`. "The first x rows" of a split
  of n shards are the first ⌈x/n⌉ or ⌊x/n⌋ rows of each shard (the first x mod n shards give one more), as
  `IterableDataset.take` counts them; so `train[:1000]` and `train[1000:]` are exactly complementary, on any process
  and worker count. A shard shorter than its quota gives fewer rows; evaluation reports the exact count.
- Folders. datasets streams an imagefolder as one shard in path order, which is sorted by class: one lane would
  read it and every block would hold one or two classes. `shard_folder_streams` deals its files into shards instead.
  Integer labels (a webdataset's `.cls`) are named by data.class_names: a stream cannot be read whole to count them.
- Lanes. Each of the P processes reads with W' = min(data.num_workers, n // P) DataLoader workers (at least 1; none
  started when num_workers is 0): P x W' lanes, lane p * W' + w. When n >= P, lane l reads whole shards l, l + P W',
  l + 2 P W', ...: every shard belongs to exactly one lane, and lanes differ by at most one shard when P W' does not
  divide n. When n < P, each of the single lanes reads every shard and keeps the rows r with r mod P = p (so each
  process reads all the data). For comparison, `datasets.distributed.split_dataset_by_node` switches to that split
  by example as soon as P does not divide n, and its DataLoader workers take whole shards too and stop the workers
  left without one ("Too many dataloader workers"); here no worker is started idle instead.
- Shuffling. A lane reads its shards in an order drawn from (train.seed, epoch, lane), each in blocks of
  `data.shuffle_buffer` rows (one arrow table from `IterableDataset.iter`), and emits each block in a permutation
  drawn from (seed, epoch, shard, block): a block shuffle, not datasets' rolling buffer. That is what makes the
  resume exact: datasets' own `shuffle` buffer is documented to lose its contents on `load_state_dict`, while the
  position of a block start is a small `state_dict` of an unshuffled single-shard stream, after which one block is
  read again and the rows already emitted are skipped. A batch mixes rows of one block of one lane; data sets whose
  shards are sorted by class need shuffled shards (or a buffer that spans one).
- Epochs. An epoch of a stream is one pass of a process over its part of it: the DataLoader of that process ends when
  each of its lanes has read its shards, and the next epoch starts with new workers (they take the epoch and the
  resume position with them). The last batch of each lane in an epoch may be short: no sample is dropped or
  repeated. Processes with more rows run a little longer epochs: each process's stream is endless, so no process
  ever waits for another's data. Nothing needs a length: `Progress.epoch_samples`, `samples_in_epoch` and
  `batches_in_epoch` stay 0 (the position is this module's state), `Progress.epoch` counts the main process's
  passes, and the progress bar counts updates.
- Resume. Each batch carries (lane, position after its last row) out of its worker; the main process keeps the
  position of the last batch it handed on from each lane, and which lane it took last. `StreamLoader.state_dict`
  gathers every process's (a collective: `accelerator.save_state` calls it on every process) into the checkpoint;
  `load_state_dict` gives each process its own, and starts the DataLoader's round robin over the workers at the lane
  that came next (torch hands out the batches of an iterable data set's workers in turn, skipping finished ones).
  Checkpoint and resume need the same processes and workers: refused in one line otherwise.
- Evaluation. The lanes of minival and test are read once, unshuffled; processes may hold unequal parts, so a process
  that has run out feeds a one-image padding batch (row index -1) until every process has (one small all-reduce a
  batch): every process runs as many forward passes (collectives under FSDP stay matched), and
  `evaluation.gather_rows` drops the padding. The row index of a sample is shard * 10**9 + its row in the shard,
  unique in the split, so each sample is counted exactly once.
"""

import dataclasses
import logging
import os
import re
from collections.abc import Iterator

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from vit_hf.utils.errors import UserError

logger = logging.getLogger(__name__)

SHARD_ROWS = 10**9  # the row index of a sample: shard * SHARD_ROWS + row in the shard
_PART = re.compile(r"^\s*([\w.-]+)\s*(?:\[\s*([^\]:]*?)\s*:\s*([^\]]*?)\s*\])?\s*$")


def parse_split(expression: str, field: str) -> list[tuple[str, int, int | None]]:
    """(split, start, stop) of each part of a streamable split expression; a one-line UserError naming FIELD."""
    parts = []
    for text in expression.split("+"):
        match = _PART.match(text)
        bounds = match.groups()[1:] if match else ()
        if not match or not all(bound in (None, "") or bound.isdigit() for bound in bounds):
            raise UserError(
                f"{field}: {expression!r} cannot stream: with data.streaming a split is a split name or absolute "
                "rows (train, train[:1000], train[1000:], train[500:1500], joined with +); percentages and "
                "negative rows need the split's length"
            )
        name, start, stop = match.group(1), match.group(2) or "0", match.group(3)
        start, stop = int(start), int(stop) if stop else None
        if stop is not None and stop <= start:
            raise UserError(f"{field}: {expression!r} is empty ({name}[{start}:{stop}])")
        parts.append((name, start, stop))
    return parts


def _quota(rows: int, shards: int, shard: int) -> int:
    """The rows of shard SHARD among the first ROWS of a split of SHARDS shards (as `IterableDataset.take`)."""
    return rows // shards + (shard < rows % shards)


@dataclasses.dataclass
class _Shard:
    """Rows [start, stop) of one shard of a streamed split (stop None: to its end)."""

    dataset: datasets.IterableDataset  # the whole split; `open` cuts the shard out
    index: int
    count: int  # the split's shards
    start: int
    stop: int | None

    def open(self, columns: list[str]) -> datasets.IterableDataset:
        shard = self.dataset.shard(num_shards=self.count, index=self.index, contiguous=True)
        return shard.select_columns(columns).with_format("arrow")


@dataclasses.dataclass
class StreamSplit:
    """A split of a streamed data set: its shards (a `+` of parts puts theirs one after the other) and its field."""

    shards: list[_Shard]
    field: str  # data.train_split, data.eval_split or data.test_split
    expression: str

    @property
    def num_shards(self) -> int:
        return len(self.shards)


def stream_split(source: datasets.IterableDatasetDict, expression: str, name: str, field: str) -> StreamSplit:
    """The shards and row ranges of a streamable split expression (`parse_split`)."""
    shards = []
    for split, start, stop in parse_split(expression, f"data.{field}"):
        if split not in source:
            raise UserError(f"data set {name!r}, data.{field} {expression!r}: no split {split!r} ({', '.join(source)})")
        dataset = source[split]
        count = dataset.num_shards
        for index in range(count):
            shard_stop = None if stop is None else _quota(stop, count, index)
            shard = _Shard(dataset, index, count, _quota(start, count, index), shard_stop)
            if shard_stop is None or shard_stop > shard.start:
                shards.append(shard)
    if not shards:
        raise UserError(f"data set {name!r}, data.{field} {expression!r} is empty")
    return StreamSplit(shards, f"data.{field}", expression)


# A streamed folder of images is dealt into shards of at most this many files, and at least FOLDER_SHARDS shards.
FOLDER_SHARD_FILES = 1000
FOLDER_SHARDS = 256


def shard_folder_streams(source: datasets.IterableDatasetDict, dataset: dict) -> datasets.IterableDatasetDict:
    """An imagefolder stream (local or on the Hub) cut into shards of files, in a fixed random order.

    datasets streams a folder as one shard in path order, that is sorted by class: one lane a process would read it,
    and every block (data.shuffle_buffer rows) would hold one or two classes. Here each split's files are permuted
    with a fixed seed (so split expressions like `train[:1000]` name the same files on every run) and dealt into
    shards, read as datasets' imagefolder reads them: the image by its path (or URL), the label from its folder.
    A folder with a metadata file streams as datasets reads it (one shard, with a warning); zip archives labelled by
    their folders are refused in one line (datasets labels their images by the archive's own folder).
    """
    from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder

    try:
        builder = datasets.load_dataset_builder(**dataset)
    except Exception:  # the stream opened, so this cannot fail on a name; leave anything unusual alone
        return source
    if not isinstance(builder, FolderBasedBuilder) or builder.BASE_COLUMN_NAME != "image":
        return source
    sharded = {}
    for split, stream in source.items():
        files, others = [], []
        for file in map(str, builder.config.data_files.get(split, [])):
            root, extension = os.path.splitext(file)
            is_image = {extension.lower(), os.path.splitext(root)[1].lower()} & set(builder.EXTENSIONS)
            (files if is_image else others).append(file)
        # Metadata files and zip archives are read by datasets' own imagefolder; other files it ignores too.
        names = set(builder.config.metadata_filenames or builder.METADATA_FILENAMES)
        metadata = [file for file in others if os.path.basename(file) in names]
        archives = [file for file in others if file.lower().endswith(".zip")]
        if archives and not metadata and isinstance(stream.features.get("label"), datasets.ClassLabel):
            # datasets (5.2) labels an archive's images by the folder of the archive, not by their own folders.
            raise UserError(
                f"data.dataset: split {split!r} holds zip archives ({os.path.basename(archives[0])}), whose images "
                "datasets labels by the archive's folder, not their own: extract them, or write parquet or "
                "webdataset shards"
            )
        if metadata or archives or set(stream.features) - {"image", "label"}:
            logger.warning(
                "split %r of the folder streams as datasets reads a folder with metadata files or zip archives: one "
                "shard, in file order, so one worker a process and blocks of neighbouring files; for a shuffled "
                "stream, write the images as parquet or webdataset shards",
                split,
            )
            return source
        order = np.random.default_rng(0).permutation(len(files))
        count = max(-(-len(files) // FOLDER_SHARD_FILES), min(len(files), FOLDER_SHARDS))
        shards = [[files[i] for i in order[k::count]] for k in range(count)]
        label = stream.features.get("label")
        sharded[split] = datasets.IterableDataset.from_generator(
            _folder_rows, features=stream.features, gen_kwargs={"shards": shards, "label": label}
        )
    return datasets.IterableDatasetDict(sharded)


def _folder_rows(shards: list[list[str]], label: datasets.ClassLabel | None) -> Iterator[dict]:
    """The rows of some shards of a folder: each image by path, labelled by its folder's name (as imagefolder)."""
    for files in shards:
        for file in files:
            row = {"image": {"path": file, "bytes": None}}
            if label is not None:
                row["label"] = label.str2int(os.path.basename(os.path.dirname(file)))
            yield row


def check_stream_features(source: datasets.IterableDatasetDict, name: str) -> None:
    """What `_find_columns` needs of a stream, without reading it: declared features."""
    if next(iter(source.values())).features is None:
        raise UserError(
            f"data.dataset: the stream of {name!r} declares no features (column types): give load_dataset a "
            "source that does (parquet, imagefolder, webdataset, a Hub repo with dataset_info)"
        )


def lane_plan(shards: int, processes: int, workers: int) -> tuple[int, bool]:
    """(DataLoader workers of each process, at least 1 lane; whether the processes split the rows by example)."""
    if shards < processes:
        return 1, True
    return max(1, min(workers, shards // processes)), False


class _StreamRows(torch.utils.data.IterableDataset):
    """The rows of one lane of one process in one epoch, (index, epoch, label, image, lane, position after it).

    The DataLoader copies this object into each worker when an epoch starts: `epoch`, `rotation` (which lane the
    round robin starts at) and `starts` (lane -> position to resume from) travel with it.
    """

    def __init__(self, split: StreamSplit, columns: list[str], plan: tuple[int, bool], process: int, processes: int,
                 shuffle: bool, seed: int, block: int):  # fmt: skip
        self.split, self.columns, self.process, self.processes = split, columns, process, processes
        self.workers, self.by_example = plan
        self.shuffle, self.seed, self.block = shuffle, seed % 2**63, block
        self.epoch, self.rotation, self.starts = 0, 0, {}

    def lane_shards(self, lane: int, epoch: int) -> list[int]:
        """The shards of a lane (of this process) in the order it reads them in EPOCH."""
        if self.by_example:
            shards = list(range(self.split.num_shards))
        else:
            shards = list(
                range(self.process * self.workers + lane, self.split.num_shards, self.processes * self.workers)
            )
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, self.process * self.workers + lane])
            shards = [shards[i] for i in rng.permutation(len(shards))]
        return shards

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        lane = 0 if info is None else (info.id + self.rotation) % info.num_workers
        yield from self._lane(lane, self.epoch, self.starts.get(lane))

    def _lane(self, lane: int, epoch: int, start: dict | None) -> Iterator[tuple]:
        order = self.lane_shards(lane, epoch)
        for position in range(start["position"] if start else 0, len(order)):
            resume = start if start and position == start["position"] else None
            try:
                yield from self._shard(lane, epoch, position, order[position], resume)
            except Exception as error:  # a shard gone, cut short or out of reach: its batch says so, the lane ends
                yield -1, epoch, _ReadFailure(f"{type(error).__name__}: {error}", order[position]), None, lane, None
                return

    def _shard(self, lane: int, epoch: int, position: int, number: int, resume: dict | None) -> Iterator[tuple]:
        shard = self.split.shards[number]
        dataset = shard.open(self.columns)
        state, first, skip = None, 0, 0  # the block's start: datasets' state and row; its rows already emitted
        if resume is not None:
            state, first, skip = resume["source"], resume["block_start"], resume["taken"]
            if state is not None:
                dataset.load_state_dict(state)
        stop = np.inf if shard.stop is None else shard.stop
        image_column, label_column = self.columns
        for table in dataset.iter(batch_size=self.block):
            following = dataset.state_dict()  # where the next block starts
            rows = np.arange(first, first + len(table))
            keep = (rows >= shard.start) & (rows < stop)
            if self.by_example:
                keep &= rows % self.processes == self.process
            kept = np.flatnonzero(keep)
            if self.shuffle:
                block = first // self.block
                kept = kept[np.random.default_rng([self.seed, epoch, number, block]).permutation(len(kept))]
            chosen = table.take(kept)
            images = chosen.column(image_column).to_pylist()
            labels = chosen.column(label_column).to_pylist()
            for taken in range(skip, len(kept)):
                after = {"position": position, "source": state, "block_start": first, "taken": taken + 1}
                row = int(rows[kept[taken]])
                image = _readable(images[taken])
                yield number * SHARD_ROWS + row, epoch, labels[taken], image, lane, after
            state, first, skip = following, first + len(table), 0
            if first >= stop:
                return


@dataclasses.dataclass(frozen=True)
class _ReadFailure:
    """In place of a row's label: the lane could not read shard SHARD (the error's type and message)."""

    error: str
    shard: int


def _readable(image: dict | None) -> dict | None:
    """The image with its bytes where only a path that is not local was stored (a remote imagefolder)."""
    if image is None or image.get("bytes") is not None or not image.get("path") or os.path.exists(image["path"]):
        return image
    from datasets.utils.file_utils import xopen

    try:
        with xopen(image["path"], "rb") as file:
            return {"bytes": file.read(), "path": image["path"]}
    except OSError:
        return image  # the decode reports it as an undecodable image of its row


@dataclasses.dataclass(frozen=True)
class _StreamCollate:
    """`vit_hf.data._Collate` on the rows of a stream, the labels checked, the lane's position carried along."""

    collate: object  # vit_hf.data._Collate
    label_column: str
    num_classes: int
    where: str

    def __call__(self, examples: list[tuple]) -> dict:
        from vit_hf.data.sources import _FailedBatch

        for index, _, label, *_ in examples:
            if isinstance(label, _ReadFailure):
                return _FailedBatch(
                    error=f"{self.where}: cannot read shard {label.shard}: {' '.join(label.error.split())}; the "
                    "checkpoints are kept: --resume auto continues from the last one once the data can be read",
                    exit_code=1,
                )
            if label is None or not 0 <= label < self.num_classes:
                shard, row = divmod(index, SHARD_ROWS)
                return _FailedBatch(
                    error=f"{self.where}: row {row} of shard {shard} has label {label} in column "
                    f"{self.label_column!r}, outside 0..{self.num_classes - 1}"
                )
        batch = self.collate([example[:4] for example in examples])
        dict.__setitem__(batch, "stream", examples[-1][4:])  # also on a failed batch: its lane read on
        return batch


class StreamLoader:
    """A process's loader of a streamed split: an epoch is one pass (`__iter__`), `endless` goes on epoch after epoch;
    batches arrive on DEVICE. With `even` (evaluation), every process yields as many batches (padding once its part
    is read). `state_dict` / `load_state_dict` resume exactly (see the module's docstring); pass it to
    `accelerator.register_for_checkpointing`."""

    def __init__(self, split: StreamSplit, rows: _StreamRows, batch_size: int, collate: _StreamCollate,
                 num_workers: int = 0, device: torch.device | str = "cpu", even: bool = False,
                 image_size: int | None = None):  # fmt: skip
        self.split, self.rows, self.batch_size, self.collate = split, rows, batch_size, collate
        self.num_workers = num_workers
        self.device, self.even, self.image_size = torch.device(device), even, image_size or 1
        self.epoch = 0
        self.lanes: dict[int, dict] = {}  # lane -> the position after the last batch handed on
        self.next_lane = 0

    def _loader(self) -> DataLoader:
        self.rows.epoch, self.rows.rotation, self.rows.starts = self.epoch, self.next_lane, dict(self.lanes)
        workers = self.num_workers and self.rows.workers  # 0: the one lane is read in this process
        return DataLoader(
            self.rows,
            batch_size=self.batch_size,
            num_workers=workers,
            collate_fn=self.collate,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if workers else None,
            # New workers each epoch take the epoch and the position along; the last batch of a lane may be short.
            persistent_workers=False,
            drop_last=False,
        )

    def __iter__(self) -> Iterator[dict]:
        """One epoch from the current position: batches of this process (and, with `even`, padding)."""
        from accelerate.utils import send_to_device

        fresh, count = not self.lanes, 0
        batches = iter(self._loader())
        while True:
            batch = next(batches, None)
            if batch is not None:
                stream = dict.pop(batch, "stream", None)
                if stream is not None and stream[1] is not None:  # None: a lane that could not read a shard
                    self.lanes[stream[0]] = stream[1]
                    self.next_lane = (stream[0] + 1) % self.rows.workers
                batch = send_to_device(batch, self.device, non_blocking=True)
            if self.even:
                if self._all_done(batch is None):
                    break
                batch = self._padding() if batch is None else batch
            elif batch is None:
                break
            count += 1
            yield batch
        if fresh and count == 0:
            who = "no process" if self.even else f"process {self.rows.process} of {self.rows.processes}"
            raise UserError(
                f"{self.split.field}: {self.split.expression!r} gives {who} any sample ({self.split.num_shards} shards)"
            )
        self.epoch += 1
        self.lanes, self.next_lane = {}, 0

    def _all_done(self, done: bool) -> bool:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return done
        flag = torch.tensor([0 if done else 1], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) == 0

    def _padding(self) -> dict:
        size = self.image_size
        return {
            "pixels": torch.zeros(1, 3, size, size, dtype=torch.uint8, device=self.device),
            "labels": torch.zeros(1, dtype=torch.int64, device=self.device),
            "index": torch.full((1,), -1, dtype=torch.int64, device=self.device),
            "skipped": torch.zeros((), dtype=torch.int64, device=self.device),
            "prepared": True,
        }

    def endless(self) -> Iterator[dict]:
        while True:
            yield from self

    def state_dict(self) -> dict:
        """Every process's position (a collective when several processes run)."""
        local = {
            "epoch": self.epoch,
            "lanes": dict(self.lanes),
            "next_lane": self.next_lane,
            "workers": self.rows.workers,
        }
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, local)
        else:
            everyone = [local]
        return {"processes": everyone}

    def load_state_dict(self, state: dict) -> None:
        saved = state["processes"]
        written = f"{_count(len(saved), 'process')} x {_count(saved[0]['workers'], 'lane')}"
        here = f"{_count(self.rows.processes, 'process')} x {_count(self.rows.workers, 'lane')}"
        if len(saved) != self.rows.processes or saved[0]["workers"] != self.rows.workers:
            raise UserError(
                f"--resume: the stream of {self.split.field} was read by {written} and would be by {here}: resume a "
                "streamed run on the processes and data.num_workers that wrote it"
            )
        mine = saved[self.rows.process]
        self.epoch, self.next_lane = mine["epoch"], mine["next_lane"]
        self.lanes = {int(lane): position for lane, position in mine["lanes"].items()}


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}{'es' if noun.endswith('s') else 's'}"


def make_stream_loader(
    split: StreamSplit,
    image_column: str,
    label_column: str,
    num_classes: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    bad_images: str = "stop",
    image_size: int | None = None,
    crop_scale=None,
    hflip: bool = False,
    process_index: int = 0,
    num_processes: int = 1,
    device: torch.device | str = "cpu",
    even: bool = False,
) -> StreamLoader:
    """A `StreamLoader` of this process's part of SPLIT, batches as `vit_hf.data.make_loader`'s (decoded by its
    collate in the workers, with row indices shard * 10**9 + row)."""
    from vit_hf.data.sources import _Collate

    if bad_images not in ("stop", "skip"):
        raise UserError(f'bad_images must be "stop" or "skip", not {bad_images!r}')
    plan = lane_plan(split.num_shards, num_processes, num_workers)
    rows = _StreamRows(split, [image_column, label_column], plan, process_index, num_processes, shuffle, seed,
                       shuffle_buffer)  # fmt: skip
    collate = _StreamCollate(
        _Collate(image_column, bad_images, image_size, crop_scale, hflip, seed), label_column, num_classes, split.field
    )
    return StreamLoader(split, rows, batch_size, collate, num_workers, device, even, image_size)
