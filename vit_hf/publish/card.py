"""The model card of a fine-tuning run's output folder: README.md and the training curves it shows.

`write_model_card(output_dir)` writes README.md: Hub metadata with a model-index (test and minival accuracy),
the base checkpoint, data and splits, every field of the resolved recipe, steps, hardware, wall time, the
training curves (training_curves.png, from the run's train_log.jsonl and eval_log.jsonl) and how to use the model.
"""

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from vit_hf.models.build import is_official_checkpoint
from vit_hf.models.download import CATALOG
from vit_hf.publish.charts import Series, line_charts
from vit_hf.recipe import SPLIT_FIELDS
from vit_hf.training.run_log import read_run_scalars
from vit_hf.utils.errors import UserError
from vit_hf.utils.files import atomic_file, public_name

CARD = "README.md"
CURVES = "training_curves.png"
PAPER = "https://arxiv.org/abs/2010.11929"
# The evaluated splits: their name in the card, their field in the recipe's data section, their key in results.json.
REPORTED_SPLITS = tuple((name, SPLIT_FIELDS[key], key) for name, key in (("test", "test"), ("minival", "eval")))
# Minival is evaluated every few hundred steps (a line with dots); test once, at the end (a star).
EVAL_STYLES = {
    "eval": {"colour": "tab:orange", "marker": "o", "label": "minival"},
    "test": {"colour": "tab:green", "marker": "*", "line": False, "label": "test"},
}


# ----------------------------------------------------------------------------------------------------------
# Training curves


def _smooth(values: list[float]) -> list[float]:
    """TensorBoard's smoothing (an exponential moving average, debiased at the start) over about 2% of the run.

    The training loss is logged every update, so a fixed weight would leave a long run's curve as noisy as its raw
    points.
    """
    weight = max(0.0, 1 - 50 / len(values))
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**i))
    return smoothed


def plot_training_curves(scalars: dict[str, list[tuple[int, float]]], path: str | os.PathLike) -> Path | None:
    """Loss (train and minival) and accuracy (minival and test) against the step, as a PNG at PATH.

    Returns PATH, or None (and writes nothing) when the run logged none of these scalars.
    """
    if not any(tag in scalars for tag in ("train/loss", "eval/loss", "eval/accuracy", "test/accuracy")):
        return None
    loss, accuracy = [], []
    if "train/loss" in scalars:
        values = [value for _, value in scalars["train/loss"]]
        steps = [step for step, _ in scalars["train/loss"]]
        loss.append(Series(scalars["train/loss"], "tab:blue", alpha=0.25, width=1))
        loss.append(Series(list(zip(steps, _smooth(values), strict=True)), "tab:blue", label="train (smoothed)"))
    for series, metric in ((loss, "loss"), (accuracy, "accuracy")):
        for split, style in EVAL_STYLES.items():
            if f"{split}/{metric}" in scalars:
                series.append(Series(scalars[f"{split}/{metric}"], **style))
    with atomic_file(path) as staging:  # a kill or a full disk leaves the earlier picture, never half of one
        line_charts([("loss", loss), ("accuracy", accuracy)], x_label="step").savefig(staging, format="png")
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# What is published


def _file_names(files: object) -> object:
    """`data_files` (a path, a list, or lists by split) with each file by its base name (URLs as they are)."""
    if isinstance(files, dict):
        return {split: _file_names(value) for split, value in files.items()}
    if isinstance(files, list):
        return [_file_names(value) for value in files]
    return files if not isinstance(files, str) or "://" in files else Path(files).name


def public_recipe(recipe: dict) -> dict:
    """RECIPE as the card and the uploaded recipe.json show it: data files and local paths by their base names, and
    no output.dir, so that nothing names the training machine's folders. The run's recipe.json keeps them: a
    resume reads it."""
    recipe = copy.deepcopy(recipe)
    if "output" in recipe:
        recipe["output"].pop("dir", None)
        if not recipe["output"]:
            del recipe["output"]
    model, data = recipe.get("model") or {}, recipe.get("data") or {}
    if isinstance(model.get("pretrained"), str):
        model["pretrained"] = public_name(model["pretrained"])
    dataset = data.get("dataset")
    if isinstance(dataset, str):
        data["dataset"] = public_name(dataset)
    elif isinstance(dataset, dict):
        for key in ("path", "data_dir", "cifar_archive"):
            if isinstance(dataset.get(key), str):
                dataset[key] = public_name(dataset[key])
        if "data_files" in dataset:
            dataset["data_files"] = _file_names(dataset["data_files"])
    return recipe


def public_results(results: dict) -> dict:
    """RESULTS as the card and the uploaded results.json show them: the base model and data set by base name."""
    results = dict(results)
    for key in ("base_model", "dataset"):
        if isinstance(results.get(key), str):
            results[key] = public_name(results[key])
    return results


# ----------------------------------------------------------------------------------------------------------
# The model card


def read_run_json(path: Path) -> dict:
    """A run's recipe.json or results.json, or a one-line UserError."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path.parent}: not a fine-tuning run's output folder (no {path.name})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None


def _hub_model_id(source: str | None) -> str | None:
    """SOURCE if it names a model on the Hub (not an official checkpoint, a URL or a local path), else None."""
    if source is None or is_official_checkpoint(source) or Path(source).exists():
        return None
    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    return source


def _base_model_text(source: str | None) -> str:
    if source is None:
        return "none (trained from scratch)"
    if source in CATALOG:
        return f"Google's official ViT checkpoint [`{source}`]({CATALOG[source]})"
    if is_official_checkpoint(source):
        return f"the official-layout ViT checkpoint `{source}`"
    if _hub_model_id(source):
        return f"[{source}](https://huggingface.co/{source})"
    return f"the local model folder `{source}`"


def _card_data(recipe: dict, results: dict, model_name: str) -> ModelCardData:
    """The card's Hub metadata: library, task, license, data set, base model and the model-index."""
    dataset = results["dataset"]
    data = recipe["data"]
    hub_dataset = dataset if "/" in dataset else None  # a local folder's name is no Hub id
    evals = [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset,
            dataset_name=f"{dataset} ({name})",
            dataset_split=data[field],
            metric_type="accuracy",
            metric_value=results[f"{key}_accuracy"],
            metric_name=f"{name.capitalize()} accuracy",
        )
        for name, field, key in REPORTED_SPLITS
        if results.get(f"{key}_accuracy") is not None
    ]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license="apache-2.0",
        datasets=[hub_dataset] if hub_dataset else None,
        base_model=_hub_model_id(results["base_model"]),
        tags=["vision", "image-classification", "vit", "vit-hf"],
        model_name=model_name,
        eval_results=evals or None,
    )


def _flatten(value: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted.key, value) for every leaf of a nested dict; an empty dict is a leaf."""
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield from _flatten(sub, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, value


def _cell(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return " ".join(text.split()).replace("|", "\\|")


def _results_rows(recipe: dict, results: dict) -> list[str]:
    rows = []
    for name, field, key in REPORTED_SPLITS:
        if results.get(f"{key}_accuracy") is not None:
            loss = results.get(f"{key}_loss")
            rows.append(
                f"| {name} | `{recipe['data'][field]}` | {results[f'{key}_samples']:,} | "
                f"{results[f'{key}_accuracy']:.2%} | {'—' if loss is None else f'{loss:.4f}'} |"
            )
    return rows


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{seconds / 60:.1f} min"


def _trained_parameters_lines(recipe: dict, results: dict) -> list[str]:
    """How many weights trained: all, or LoRA's adapters and head (none for a run from before the count)."""
    trained, total = results.get("trainable_parameters"), results.get("total_parameters")
    if not trained:
        return []
    share = f"{trained:,} of {total:,} parameters trained ({trained / total:.2%})"
    lora = recipe["model"].get("lora")
    if lora is None:
        return [f"- {share}."]
    return [
        f"- LoRA (r {lora['r']}, alpha {lora['alpha']}, on {', '.join(lora['target_modules'])}): {share}, the "
        "adapters and the new head; the exported weights have the adapters merged in, so loading needs no peft."
    ]


def _card_text(recipe: dict, results: dict, model_id: str | None, curves: bool) -> str:
    """The markdown body of the card (everything below the metadata)."""
    name, dataset = recipe["name"], results["dataset"]
    image_size, classes = recipe["model"]["image_size"], results["class_names"]
    lines = [
        f"# {name}",
        "",
        *([recipe["description"], ""] if recipe.get("description") else []),
        f"A Vision Transformer ([Dosovitskiy et al., 2021]({PAPER})) "
        f"{'fine-tuned' if results['base_model'] else 'trained from scratch'} on {dataset} at "
        f"{image_size}×{image_size} px. {len(classes)} classes: {', '.join(classes[:20])}"
        f"{', …' if len(classes) > 20 else ''}.",
        "",
        "## Results",
        "",
        "| split | recipe split | images | accuracy | loss |",
        "|---|---|---|---|---|",
        *_results_rows(recipe, results),
        "",
        f"The model is the one with the best minival accuracy, at step {results['best_step']} of {results['step']}. "
        "Minival is carved from the training data and serves model selection; the test split is only reported."
        if results.get("eval_accuracy") is not None
        else f"The model is the last one, at step {results['step']}: the run had no minival split.",
        "",
        "## Training",
        "",
        *_training_lines(recipe, results),
        "",
        "### Training curves",
        "",
        f"![Loss and accuracy against the step]({CURVES})" if curves else "The run logged no loss or accuracy.",
        "",
        "### Hyperparameters",
        "",
        "The resolved recipe (`recipe.json` in this repository), every field:",
        "",
        "| field | value |",
        "|---|---|",
        *(f"| `{key}` | {_cell(value)} |" for key, value in _flatten(recipe)),
        "",
        *_usage_lines(name, image_size, model_id),
    ]
    return "\n".join(lines)


def _training_lines(recipe: dict, results: dict) -> list[str]:
    """The card's training bullets: base, data, batch, weights, parameters, steps, hardware."""
    data, dataset, processes = recipe["data"], results["dataset"], results["num_processes"]
    return [
        f"- Base checkpoint: {_base_model_text(results['base_model'])}.",
        f"- Data: {dataset}; training split `{data['train_split']}`, minival `{data['eval_split']}`, "
        f"test `{data['test_split']}`"
        + (
            f"; {data['examples_per_class']} examples of each class, {results.get('train_examples')} images in all."
            if data.get("examples_per_class")
            else "."
        ),
        *(
            [
                f"- Micro-batch {results['micro_batch_size']} x {results['accumulation_steps']} accumulation steps a "
                'process, found by `train.micro_batch_size: "auto"` to fit the device.'
            ]
            if results.get("micro_batch_size_auto")
            else []
        ),
        *(
            [
                f"- Exported weights: their moving average (`train.ema_decay` {recipe['train']['ema_decay']}), "
                "which was better on minival than the trained weights."
            ]
            if results.get("exported_weights") == "ema average"
            else []
        ),
        *_trained_parameters_lines(recipe, results),
        f"- {results['step']:,} optimizer steps of {recipe['train']['global_batch_size']} images: "
        f"{results['images_seen']:,} training images seen.",
        f"- Hardware: {results['hardware']} ({processes} process{'es' if processes != 1 else ''}), mixed precision "
        f"{results['mixed_precision']}{', compiled' if results.get('compiled') else ''}; "
        f"{_duration(results['wall_seconds'])} wall time, "
        f"{results['train_samples_per_second']:,.0f} training images per second.",
    ]


def _usage_lines(name: str, image_size: int, model_id: str | None) -> list[str]:
    return [
        "## How to use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'classifier = pipeline("image-classification", model="{model_id or "path/to/" + name}")',
        'print(classifier("image.jpg", top_k=5))',
        "```",
        "",
        f"The image processor resizes to {image_size}×{image_size} (bilinear) and scales pixels to [-1, 1], "
        "as the official ViT code does.",
        "",
    ]


def write_model_card(output_dir: str | os.PathLike, model_id: str | None = None) -> Path:
    """Write OUTPUT_DIR/README.md (and training_curves.png) for a fine-tuning run's output folder.

    MODEL_ID, when given, is the Hub repository the usage example loads from.
    """
    output_dir = Path(output_dir)
    recipe = public_recipe(read_run_json(output_dir / "recipe.json"))
    results = public_results(read_run_json(output_dir / "results.json"))
    curves = plot_training_curves(read_run_scalars(output_dir), output_dir / CURVES)
    data = _card_data(recipe, results, model_id or recipe["name"])
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_text(recipe, results, model_id, curves is not None)}")
    path = output_dir / CARD
    with atomic_file(path) as staging:
        card.save(staging)
    return path
