"""A recipe's whole run done with `transformers.Trainer`: the Trainer side of `bench_loop.py --whole-process`.

    python benchmarks/trainer_baseline.py RECIPE.json

It does the work of `python -m vit_hf.finetune RECIPE.json` the way the transformers image-classification example would:
it loads the train and test splits of the recipe's data set with `datasets`, builds a from-scratch ViT of the recipe's
shape, trains it for `schedule.total_steps` updates of the recipe's batch, precision, SGD (or AdamW), clipping and
warmup-cosine schedule, fed by per-image PIL transforms in the workers (random resized crop and flip; resize for the
test split), logs every `train.log_every` updates to the recipe's trackers, saves a checkpoint every `train.save_every`
updates, scores the test split, and saves the model, its image processor and a model card into `output.dir`. It imports
only what such a script would (nothing of `vit_hf`), so its startup is the Trainer's own. It writes
`trainer_results.json` there: the test accuracy and where the time went (`startup_seconds` from launch to the start of
training, `train_seconds`, `finish_seconds` from the end of training to the end).
"""

import argparse
import functools
import json
import math
import random
import time
from pathlib import Path

import datasets
import numpy as np
import psutil
import torch
from PIL import Image
from transformers import (
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

RESULTS = "trainer_results.json"
# The from-scratch ViT of vit_hf's build_model: ViT-B/16's shape, the official GELU and layer-norm epsilon.
BASE_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
BASE_CONFIG |= {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}


def example_crop_box(width: int, height: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, width, height): torchvision's RandomResizedCrop.get_params (aspect ratio 3/4 to 4/3), with
    Python's random module."""
    for _ in range(10):
        area = width * height * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_width, crop_height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left, top = random.randint(0, width - crop_width), random.randint(0, height - crop_height)
            return left, top, crop_width, crop_height
    crop_width, crop_height = min(width, round(height * 4 / 3)), min(height, round(width * 4 / 3))
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def example_pixels(image: Image.Image) -> torch.Tensor:
    """ToTensor() then Normalize(0.5, 0.5) as torchvision does them: (3, H, W) float32 in [-1, 1]."""
    pixels = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous().float().div(255)
    mean = std = torch.tensor([0.5, 0.5, 0.5]).view(-1, 1, 1)
    return pixels.clone().sub_(mean).div_(std)  # Normalize(inplace=False) works on a clone


def example_train_image(image: Image.Image, size: int, scale: tuple[float, float], hflip: bool) -> torch.Tensor:
    """RandomResizedCrop(size, scale), RandomHorizontalFlip() if HFLIP, ToTensor(), Normalize(0.5, 0.5) of one PIL
    image, as torchvision's transforms (v1, the transformers example's) do them: crop, then resize the copy."""
    left, top, width, height = example_crop_box(image.width, image.height, scale)
    image = image.crop((left, top, left + width, top + height)).resize((size, size), Image.BILINEAR)
    if hflip and random.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return example_pixels(image)


def train_transform(rows: dict, image_column: str, size: int, scale: tuple[float, float], hflip: bool) -> dict:
    """The example's `with_transform` function for training: each image of a batch of rows on its own."""
    images = [example_train_image(image.convert("RGB"), size, scale, hflip) for image in rows[image_column]]
    return rows | {"pixel_values": images}


def eval_transform(rows: dict, image_column: str, size: int) -> dict:
    return rows | {
        "pixel_values": [
            example_pixels(image.convert("RGB").resize((size, size), Image.BILINEAR)) for image in rows[image_column]
        ]
    }


def collate(rows: list[dict], label_column: str) -> dict:
    labels = torch.tensor([row[label_column] for row in rows])
    return {"pixel_values": torch.stack([row["pixel_values"] for row in rows]), "labels": labels}


def accuracy(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


class _Times(TrainerCallback):
    """When training begins and ends."""

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.begin = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.end = time.perf_counter()


def columns(dataset: datasets.Dataset) -> tuple[str, str]:
    """The image column and the label column (the first Image and ClassLabel features)."""
    image = next(name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image))
    label = next(name for name, feature in dataset.features.items() if isinstance(feature, datasets.ClassLabel))
    return image, label


def optimizer_for(model: torch.nn.Module, optim: dict) -> torch.optim.Optimizer:
    if optim["name"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=optim["lr"], betas=tuple(optim["betas"]))
    return torch.optim.SGD(model.parameters(), lr=optim["lr"], momentum=optim["momentum"], nesterov=optim["nesterov"])


def load_data(recipe: dict) -> tuple:
    """The train and test splits with the example's per-image transforms, the class names and the label column."""
    data = recipe["data"]
    source = data["dataset"]
    train_set = datasets.load_dataset(**source, split=data["train_split"])
    test_set = datasets.load_dataset(**source, split=data["test_split"]) if data["test_split"] else None
    image_column, label_column = columns(train_set)
    names = train_set.features[label_column].names
    size, augment = recipe["model"]["image_size"], data["augment"] or {}
    scale = tuple(augment.get("crop_scale") or (1.0, 1.0))
    train_set = train_set.with_transform(
        functools.partial(
            train_transform, image_column=image_column, size=size, scale=scale, hflip=augment.get("hflip", False)
        )
    )
    if test_set is not None:
        test_set = test_set.with_transform(functools.partial(eval_transform, image_column=image_column, size=size))
    return train_set, test_set, names, label_column


def training_arguments(recipe: dict, out: Path) -> TrainingArguments:
    data, train, schedule = recipe["data"], recipe["train"], recipe["schedule"]
    return TrainingArguments(
        str(out),
        per_device_train_batch_size=train["micro_batch_size"],
        per_device_eval_batch_size=train["eval_batch_size"],
        gradient_accumulation_steps=train["global_batch_size"] // train["micro_batch_size"],
        max_steps=schedule["total_steps"],
        max_grad_norm=recipe["optim"]["max_grad_norm"] or 0.0,
        bf16=train["mixed_precision"] == "bf16",
        fp16=train["mixed_precision"] == "fp16",
        torch_compile=train["compile"],
        dataloader_num_workers=data["num_workers"],
        remove_unused_columns=False,  # the transforms need the image column
        eval_strategy="no",
        save_strategy="steps",
        save_steps=train["save_every"],
        logging_steps=train["log_every"],
        report_to=train["report_to"] or "none",
        seed=train["seed"],
        use_cpu=not torch.cuda.is_available(),  # bf16 on a CPU is refused unless asked for explicitly
    )


def train(recipe_path: str, launched: float) -> dict:
    """Train, test and save as RECIPE_PATH (a resolved recipe with a from-scratch model) says; the results.

    LAUNCHED is the process's launch on the `time.perf_counter` clock, the start of `startup_seconds`.
    """
    recipe = json.loads(Path(recipe_path).read_text())
    out, schedule, size = Path(recipe["output"]["dir"]), recipe["schedule"], recipe["model"]["image_size"]
    train_set, test_set, names, label_column = load_data(recipe)
    torch.manual_seed(recipe["train"]["seed"])
    labels = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    config = ViTConfig(
        image_size=size, num_labels=len(names), hidden_dropout_prob=float(recipe["model"]["dropout"]),
        **BASE_CONFIG | recipe["model"]["config"] | labels,
    )  # fmt: skip
    model = ViTForImageClassification(config)
    optimizer = optimizer_for(model, recipe["optim"])
    decay = get_cosine_schedule_with_warmup if schedule["name"] == "cosine" else get_linear_schedule_with_warmup
    scheduler = decay(optimizer, schedule["warmup_steps"], schedule["total_steps"])
    processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    times = _Times()
    trainer = Trainer(
        model=model,
        args=training_arguments(recipe, out),
        train_dataset=train_set,
        data_collator=functools.partial(collate, label_column=label_column),
        processing_class=processor,
        compute_metrics=accuracy,
        optimizers=(optimizer, scheduler),
        callbacks=[times],
    )
    trainer.train()
    results = trainer.evaluate(test_set, metric_key_prefix="test") if test_set is not None else {}
    trainer.save_model()
    trainer.create_model_card(model_name=recipe["name"])
    results |= {
        "startup_seconds": times.begin - launched,
        "train_seconds": times.end - times.begin,
        "finish_seconds": time.perf_counter() - times.end,
    }
    (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe named on the command line; print its results as one JSON line and return them."""
    launched = time.perf_counter() - (time.time() - psutil.Process().create_time())
    parser = argparse.ArgumentParser(prog="benchmarks/trainer_baseline.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a resolved JSON recipe with a from-scratch model (as bench_loop.py writes)")
    results = train(parser.parse_args(argv).recipe, launched)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
