"""The run's batches: a loader for each split, and the training micro-batches as one endless, resumable stream."""

from collections.abc import Iterator

import torch
from accelerate import Accelerator

from vit_hf.data.loader import make_loader
from vit_hf.data.sources import DataSplits
from vit_hf.data.stream_loader import make_stream_loader
from vit_hf.data.streaming import StreamSplit
from vit_hf.training.checkpoint import Progress
from vit_hf.utils.errors import UserError


def split_loader(recipe: dict, splits: DataSplits, accelerator: Accelerator, dataset, batch_size: int, train: bool):
    """A loader of DATASET, one of the SPLITS of RECIPE.

    Training batches carry the crop and flip settings: photos larger than the model are cropped in the workers (see
    `vit_hf.data`); evaluation batches are whole images. A streamed split (data.streaming) gets a `StreamLoader` of
    this process's part: evaluation ones even out the batch counts of the processes.
    """
    data, augment, seed = recipe["data"], recipe["data"]["augment"] or {}, recipe["train"]["seed"]
    crop_scale, hflip = (augment.get("crop_scale"), augment.get("hflip", False)) if train else (None, False)
    image_size, columns = recipe["model"]["image_size"], (splits.image_column, splits.label_column)
    if splits.streaming and isinstance(dataset, StreamSplit):
        return make_stream_loader(
            dataset, *columns, len(splits.class_names), batch_size, shuffle=train, seed=seed,
            num_workers=data["num_workers"], shuffle_buffer=data["shuffle_buffer"], bad_images=data["bad_images"],
            image_size=image_size, crop_scale=crop_scale, hflip=hflip, process_index=accelerator.process_index,
            num_processes=accelerator.num_processes, device=accelerator.device, even=not train,
        )  # fmt: skip
    return make_loader(
        dataset, *columns, batch_size, shuffle=train, seed=seed, num_workers=data["num_workers"], drop_last=train,
        bad_images=data["bad_images"], image_size=image_size, crop_scale=crop_scale, hflip=hflip,
    )  # fmt: skip


def make_loaders(recipe: dict, splits: DataSplits, accelerator: Accelerator) -> tuple:
    """The training loader, and the evaluation loaders by split name ("eval", "test": those the recipe has)."""
    cfg, processes = recipe["train"], accelerator.num_processes
    train_loader = split_loader(recipe, splits, accelerator, splits.train, cfg["micro_batch_size"], train=True)
    if not splits.streaming and len(train_loader) < processes:  # a stream checks its parts as it reads them
        raise UserError(
            f"data.train_split: {len(splits.train)} images do not fill one micro-batch of "
            f"{cfg['micro_batch_size']} on each of {processes} processes"
        )
    evals = {"eval": splits.eval, "test": splits.test}
    return train_loader, {
        name: split_loader(recipe, splits, accelerator, dataset, cfg["eval_batch_size"], train=False)
        for name, dataset in evals.items()
        if dataset is not None
    }


def micro_batches(
    loader, progress: Progress, accelerator: Accelerator, micro_batch_size: int, streaming: bool
) -> Iterator[dict]:
    """An endless stream of this process's micro-batches from the training LOADER, resumable from PROGRESS."""
    if streaming:
        return _stream_micro_batches(loader, progress)
    return _epoch_micro_batches(loader, progress, accelerator, micro_batch_size * accelerator.num_processes)


def _stream_micro_batches(loader, progress: Progress) -> Iterator[dict]:
    """A streamed split's: an epoch is one pass over this process's part of the stream, and the position is the
    loader's own state (the Progress data counters stay 0)."""
    progress.epoch_samples = 0
    for batch in loader.endless():
        progress.epoch = loader.epoch
        yield batch


def _epoch_micro_batches(loader, progress: Progress, accelerator: Accelerator, batch_samples: int) -> Iterator[dict]:
    """A map-style split's, epoch after epoch, resumable mid-epoch.

    Process i takes micro-batches i, i + n, ... of the epoch's order: a micro-batch on each process is one stretch
    of the global sample stream (BATCH_SAMPLES), counted in `samples_in_epoch` too, which another process count
    can continue.
    """
    progress.epoch_samples = len(loader) * batch_samples
    while True:
        loader.set_epoch(progress.epoch)  # the shuffle of epoch e depends on (seed, e) only
        skip = progress.batches_in_epoch
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            progress.batches_in_epoch += 1
            progress.samples_in_epoch += batch_samples
            yield batch
        progress.epoch += 1
        progress.batches_in_epoch = progress.samples_in_epoch = 0


def window_weights(batches: list[dict], accelerator: Accelerator) -> list[float | torch.Tensor]:
    """The weight of each micro-batch's mean loss in its update, where images may be missing.

    The update's gradient is the sum of the per-sample losses over the window's images on every process, divided by
    their count N. The backward divides each micro-batch's loss by the accumulation A and the processes P average
    their gradients, so a micro-batch of n images weighs n * P * A / N: 1 where every micro-batch is full, 0 where
    all its images were skipped. N takes a collective on several processes, which never waits for the device.
    """
    rows = [batch["labels"].shape[0] for batch in batches]  # shapes: known without reading the device
    shares = accelerator.num_processes * len(batches)
    if accelerator.num_processes == 1:
        return [n * shares / max(sum(rows), 1) for n in rows]
    count = torch.tensor([float(sum(rows))], device=accelerator.device)
    total = accelerator.reduce(count, "sum").clamp(min=1)[0]  # a window without images: zero gradients
    return [n * shares / total for n in rows]
