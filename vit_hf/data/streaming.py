"""Streaming data (`data.streaming: true`): any `datasets.load_dataset` source read as an `IterableDataset`, for data
sets larger than the disk (Hub repos, parquet, imagefolder, webdataset shards).

This module cuts a stream into splits of shards (`StreamSplit`) and a folder into shards of files;
`vit_hf.data.stream_loader` reads them (lanes, shuffling, epochs, resume, evaluation). The design, and why:

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
from collections.abc import Iterator

import datasets
import numpy as np

from vit_hf.data.splits import parse_split
from vit_hf.utils.errors import UserError

logger = logging.getLogger(__name__)


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
        files = _folder_images(builder, split, stream)
        if files is None:
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


def _folder_images(builder, split: str, stream: datasets.IterableDataset) -> list[str] | None:
    """The image files of a split of a folder, or None where datasets' own reading of the folder must stay (metadata
    files, zip archives, columns other than image and label); zip archives labelled by their folders are refused."""
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
        return None
    return files


def _folder_rows(shards: list[list[str]], label: datasets.ClassLabel | None) -> Iterator[dict]:
    """The rows of some shards of a folder: each image by path, labelled by its folder's name (as imagefolder)."""
    for files in shards:
        for file in files:
            row = {"image": {"path": file, "bytes": None}}
            if label is not None:
                row["label"] = label.str2int(os.path.basename(os.path.dirname(file)))
            yield row


def check_stream_features(source: datasets.IterableDatasetDict, name: str) -> None:
    """What `vit_hf.data.labels.find_columns` needs of a stream, without reading it: declared features."""
    if next(iter(source.values())).features is None:
        raise UserError(
            f"data.dataset: the stream of {name!r} declares no features (column types): give load_dataset a "
            "source that does (parquet, imagefolder, webdataset, a Hub repo with dataset_info)"
        )
