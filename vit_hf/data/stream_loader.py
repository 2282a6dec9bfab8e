"""A process's loader of a streamed split (`StreamLoader`, `make_stream_loader`): its lanes of shards read in
DataLoader workers, shuffled by blocks, decoded by the loader's collate, resumed exactly from its state, and padded
so that every process evaluates as many batches. The design, and why: `vit_hf.data.streaming`.
"""

import dataclasses
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from vit_hf.data.batches import Collate, FailedBatch
from vit_hf.data.loader import leave_signals_to_the_main_process
from vit_hf.data.streaming import StreamSplit
from vit_hf.utils.errors import UserError

SHARD_ROWS = 10**9  # the row index of a sample: shard * SHARD_ROWS + row in the shard


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
    """`Collate` on the rows of a stream, the labels checked, the lane's position carried along."""

    collate: Collate
    label_column: str
    num_classes: int
    where: str

    def __call__(self, examples: list[tuple]) -> dict:
        for index, _, label, *_ in examples:
            if isinstance(label, _ReadFailure):
                return FailedBatch(
                    error=f"{self.where}: cannot read shard {label.shard}: {' '.join(label.error.split())}; the "
                    "checkpoints are kept: --resume auto continues from the last one once the data can be read",
                    exit_code=1,
                )
            if label is None or not 0 <= label < self.num_classes:
                shard, row = divmod(index, SHARD_ROWS)
                return FailedBatch(
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
            worker_init_fn=leave_signals_to_the_main_process,
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
            "skipped_rows": torch.zeros((0,), dtype=torch.int64, device=self.device),
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
    """A `StreamLoader` of this process's part of SPLIT, batches as `vit_hf.data.loader.make_loader`'s (decoded by its
    collate in the workers, with row indices shard * 10**9 + row)."""
    if bad_images not in ("stop", "skip"):
        raise UserError(f'bad_images must be "stop" or "skip", not {bad_images!r}')
    plan = lane_plan(split.num_shards, num_processes, num_workers)
    rows = _StreamRows(split, [image_column, label_column], plan, process_index, num_processes, shuffle, seed,
                       shuffle_buffer)  # fmt: skip
    collate = _StreamCollate(
        Collate(image_column, bad_images, image_size, crop_scale, hflip, seed, split.expression, SHARD_ROWS),
        label_column,
        num_classes,
        split.field,
    )
    return StreamLoader(split, rows, batch_size, collate, num_workers, device, even, image_size)
