"""Pictures of a finished training run for TensorBoard: the exported model's predictions on the first test (or
minival) images, and the attention rollouts of a few of them."""

import logging

import torch
from accelerate import Accelerator

from vit_hf.data.loader import make_loader
from vit_hf.data.sources import DataSplits
from vit_hf.data.stream_loader import make_stream_loader
from vit_hf.data.streaming import StreamSplit
from vit_hf.data.transforms import DeviceTransform

logger = logging.getLogger(__name__)


def log_prediction_pictures(
    recipe: dict, splits: DataSplits, accelerator: Accelerator, model: torch.nn.Module, evaluated: dict, count: int = 16
) -> None:
    """A grid of MODEL's predictions and a few attention rollouts of the first COUNT test (or minival) images, to
    the run's TensorBoard tracker, if it has one (main process only).

    The predictions are those of the split's evaluation just done (EVALUATED, by split name), where its rows are
    known; a picture is a nicety: if it fails, the run says so and still writes its results and card.
    """
    if "tensorboard" not in recipe["train"]["report_to"]:
        return
    name = "test" if splits.test is not None else "eval"
    if name not in evaluated:
        return
    try:
        from vit_hf.publish.attention_maps import (
            attention_rollout,
            pixels_to_images,
            prediction_grid,
            rollout_overlay,
        )

        batch = first_images(recipe, splits, splits.test if name == "test" else splits.eval, count)
        transform = DeviceTransform(recipe["model"]["image_size"], train=False)
        pixels = transform(batch["pixels"].to(accelerator.device))
        rows = batch["index"].tolist()
        predictions = _predictions_of(model, rows, pixels, evaluated[name], splits.streaming)
        images = pixels_to_images(pixels)
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        grid = prediction_grid(images, batch["labels"].tolist(), predictions, splits.class_names)
        writer.add_image("test/predictions", grid, global_step=0, dataformats="HWC")
        maps = attention_rollout(model, pixels[:4])
        for i in range(len(maps)):
            overlay = rollout_overlay(images[i], maps[i])
            writer.add_image(f"test/attention_rollout_{i}", overlay, global_step=0, dataformats="HWC")
    except Exception as error:  # noqa: BLE001 - any failure here must not lose the run's results
        logger.warning("could not draw the prediction pictures: %s", " ".join(str(error).split()))


def first_images(recipe: dict, splits: DataSplits, dataset, count: int) -> dict:
    """The first COUNT images of DATASET, one of the SPLITS of RECIPE, as one evaluation batch, read by the calling
    process alone (no worker processes: a batch read at once is quicker without starting them)."""
    data, image_size = recipe["data"], recipe["model"]["image_size"]
    columns = (splits.image_column, splits.label_column)
    if isinstance(dataset, StreamSplit):
        loader = make_stream_loader(
            dataset, *columns, len(splits.class_names), count, shuffle=False, bad_images=data["bad_images"],
            image_size=image_size,
        )  # fmt: skip
        return next(iter(loader))
    rows = dataset.select(range(min(count, len(dataset))))
    loader = make_loader(
        rows, *columns, len(rows), shuffle=False, seed=recipe["train"]["seed"], num_workers=0,
        bad_images=data["bad_images"], image_size=image_size,
    )  # fmt: skip
    return next(iter(loader))


def _predictions_of(model, rows: list[int], pixels: torch.Tensor, evaluated: dict, streaming: bool) -> list[int]:
    """The class predicted for each of ROWS: looked up in the split's evaluation (row numbers of a map-style
    split), or, for a stream's rows, computed again from PIXELS."""
    predicted = dict(zip(evaluated["index"].tolist(), evaluated["predictions"].tolist(), strict=True))
    if streaming or not all(row in predicted for row in rows):
        with torch.inference_mode():
            return model(pixel_values=pixels).logits.argmax(-1).tolist()
    return [predicted[row] for row in rows]
