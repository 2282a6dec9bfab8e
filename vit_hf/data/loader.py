"""The loader of a split read whole: uint8 batches decoded in CPU workers, each epoch's order and crops drawn from
(seed, epoch), for `DeviceTransform` on the device.

The CPU workers only decode small images: a CIFAR batch leaves them as 32 px uint8 (a few hundred kB). The crop, the
resize to the model's size, the flip and the normalisation run afterwards as batched tensor ops on the training device
(`DeviceTransform`), where they cost little, instead of per image in PIL on a few CPU cores. Photos (larger than the
model's input, or of mixed sizes) are cropped from the original and resized in the workers instead
(`vit_hf.data.photos`), so that image_size uint8 batches cross to the device.
"""

import atexit
import multiprocessing
import signal
from collections.abc import Sequence

import datasets
import torch
from torch.utils.data import DataLoader

from vit_hf.data.batches import Collate
from vit_hf.utils.errors import UserError


class _EpochSampler(torch.utils.data.Sampler):
    """(row, epoch) pairs: the rows of one epoch, shuffled or in order, each with the epoch it is drawn for.

    The workers draw a row's crop and flip from (seed, epoch, row), so the epoch travels with each row index to
    whichever worker of whichever process reads it (persistent workers hold their own copy of the data set: an epoch
    set on it in the main process would not reach them). Epoch e's order is `torch.randperm` seeded with seed + e,
    the order accelerate's SeedableRandomSampler gave the loop (data_seed=seed). This is no RandomSampler, so
    accelerate's `prepare` keeps it: its `set_epoch` reaches this sampler through BatchSamplerShard, and
    `skip_first_batches` shares it. A plain loader's next pass takes the next epoch.
    """

    def __init__(self, size: int, shuffle: bool, seed: int):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        epoch = self.epoch
        if self.shuffle:
            rows = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            rows = range(self.size)
        for row in rows:
            yield row, epoch
        self.epoch = epoch + 1


class _Rows(torch.utils.data.Dataset):
    """Map-style rows (index, epoch, label, encoded image) for (row, epoch) pairs, read a batch at a time from arrow."""

    def __init__(self, dataset: datasets.Dataset, image_column: str, label_column: str):
        # The arrow format skips datasets' per-row decoding and formatting: a batch is one `take` of raw bytes.
        self.table = dataset.select_columns([image_column, label_column]).with_format("arrow")
        self.image_column = image_column
        self.label_column = label_column

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, pair: tuple[int, int]) -> tuple[int, int, int, dict]:
        return self.__getitems__([pair])[0]

    def __getitems__(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int, int, dict]]:
        rows = self.table[[row for row, _ in pairs]]
        images = rows.column(self.image_column).to_pylist()
        labels = rows.column(self.label_column).to_pylist()
        return [(row, epoch, label, image) for (row, epoch), label, image in zip(pairs, labels, images, strict=True)]


def leave_signals_to_the_main_process(worker_id: int) -> None:
    """A worker ignores Ctrl-C and SIGTERM: the main process decides, saves its checkpoint while the workers still
    serve it, and ends them. (`accelerate launch` sends SIGTERM to the whole process tree at Ctrl-C; a worker that
    died of it would fail the update the checkpoint waits for.) A worker still ends with its main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _end_workers_at_exit() -> None:
    """At exit multiprocessing ends its daemonic children with SIGTERM, which the workers ignore, and would wait for
    them forever: end them with SIGKILL first (they only read data)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


atexit.register(_end_workers_at_exit)  # after multiprocessing's own, so it runs before it


def make_loader(
    dataset: datasets.Dataset,
    image_column: str,
    label_column: str,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    bad_images: str = "stop",
    image_size: int | None = None,
    crop_scale: Sequence[float] | None = None,
    hflip: bool = False,
) -> DataLoader:
    """A DataLoader of uint8 batches {"pixels", "labels", "index", "skipped", "skipped_rows", "prepared"}, for
    DeviceTransform.

    Epoch e's shuffle and its random crops depend on (seed, e) only; `set_epoch` chooses e. Undecodable images stop
    the loader with an error naming the file (where the row has a path), the split and the row (bad_images="stop"),
    or are left out of their batch, counted in "skipped" and listed in "skipped_rows" (bad_images="skip"); an error
    is raised where the batch is read. Batches of images larger than
    `image_size`, or of mixed sizes, are brought to image_size in the workers ("prepared": see `Collate`): the
    whole image resized, or with crop_scale a random crop of it (and a random flip if hflip), as the training
    DeviceTransform with these settings would do.
    """
    if bad_images not in ("stop", "skip"):
        raise UserError(f'bad_images must be "stop" or "skip", not {bad_images!r}')
    split = str(dataset.split) if dataset.split is not None else None  # `select_split` names it by its expression
    missing = [column for column in (image_column, label_column) if column not in dataset.column_names]
    if missing:
        raise UserError(f"data set has no column {missing[0]!r} (columns: {', '.join(dataset.column_names)})")
    rows = _Rows(dataset, image_column, label_column)
    # A plain DataLoader over a map-style data set: accelerate's `prepare` shards it across processes.
    return DataLoader(
        rows,
        batch_size=batch_size,
        sampler=_EpochSampler(len(rows), shuffle, seed),
        num_workers=num_workers,
        collate_fn=Collate(image_column, bad_images, image_size, crop_scale, hflip, seed, split),
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=leave_signals_to_the_main_process,
        # The workers' base seed comes from here, not from the global RNG that dropout uses and checkpoints save.
        generator=torch.Generator().manual_seed(seed),
    )
