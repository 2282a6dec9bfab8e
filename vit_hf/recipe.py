"""Recipes: JSON files that say everything about a run, validated before anything starts.

A recipe is read, overridden with `--set key.sub=value`, filled with defaults and checked: unknown keys, wrong
types and impossible combinations are refused with the dotted path of the field.
"""

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vit_hf.utils.errors import UserError


@dataclass(frozen=True)
class Field:
    """One leaf of the recipe: allowed types, default, and optional allowed values or a check."""

    types: tuple[type, ...]
    default: Any
    choices: tuple[Any, ...] | None = None
    positive: bool = False


def _f(types, default, choices=None, positive=False) -> Field:
    types = types if isinstance(types, tuple) else (types,)
    return Field(types, default, choices, positive)


NONE = type(None)
# The splits of a run and the field of the recipe's data section that names each.
SPLIT_FIELDS = {"train": "train_split", "eval": "eval_split", "test": "test_split"}
NUMBER = (int, float)

AUGMENT = {
    "crop_scale": _f((list, NONE), [0.05, 1.0]),
    "hflip": _f(bool, True),
    "rand_augment": _f((dict, NONE), None),
    "trivial_augment": _f(bool, False),
    "random_erasing": _f(NUMBER, 0.0),
    "mixup_alpha": _f(NUMBER, 0.0),
    "cutmix_alpha": _f(NUMBER, 0.0),
    "mix_prob": _f(NUMBER, 1.0),
    "switch_prob": _f(NUMBER, 0.5),
}

# LoRA (vit_hf.lora): low-rank adapters on these Linear layers of transformers 5's ViTLayer, checked as a section.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
LORA = {
    "r": _f(int, 8, positive=True),
    "alpha": _f(NUMBER, 16, positive=True),
    "dropout": _f(NUMBER, 0.0),
    # The query and value projections, as the LoRA paper adapts.
    "target_modules": _f(list, ["q_proj", "v_proj"]),
}

SCHEMA: dict[str, Any] = {
    "name": _f(str, "run"),
    "description": _f(str, ""),
    "model": {
        "pretrained": _f((str, NONE), "ViT-B_16"),
        "image_size": _f(int, 224, positive=True),
        "dropout": _f(NUMBER, 0.0),
        # Stochastic depth: the rate of the last block, rising linearly from 0 at the first (vit_hf.stochastic_depth).
        "drop_path": _f(NUMBER, 0.0),
        "config": _f(dict, {}),
        # LoRA fine-tuning: an object of LORA's fields (those left out take their defaults); null trains every weight.
        "lora": _f((dict, NONE), None),
    },
    "data": {
        "dataset": _f((str, dict), "cifar10"),
        "train_split": _f((str, NONE), "train[:98%]"),
        # The official code selects models on a minival split carved from train; the test split is only reported.
        "eval_split": _f((str, NONE), "train[98%:]"),
        "test_split": _f((str, NONE), "test"),
        # Percentages and row ranges of a split read whole are cut from a permutation of its rows, stratified by
        # class and fixed by split_seed (vit_hf.data.splits); "stored": from the stored order, as tfds and datasets.
        "split_order": _f(str, "shuffled", choices=("shuffled", "stored")),
        "split_seed": _f(int, 0),
        # K rows of each class, drawn with train.seed, instead of the whole train split (BiT's low-data fine-tuning).
        "examples_per_class": _f((int, NONE), None, positive=True),
        "image_column": _f((str, NONE), None),
        "label_column": _f((str, NONE), None),
        # The classes of an integer label column, in label order (webdataset's .cls); names a ClassLabel's anew.
        "class_names": _f((list, NONE), None),
        "augment": (AUGMENT, NONE),
        "num_workers": _f(int, 4),
        "bad_images": _f(str, "stop", choices=("stop", "skip")),
        # Read the data set as a stream (datasets' IterableDataset, vit_hf.streaming): nothing downloaded whole.
        "streaming": _f(bool, False),
        # With streaming: rows of one worker shuffled together (a block of this many rows, in a random order).
        "shuffle_buffer": _f(int, 1000, positive=True),
    },
    "optim": {
        "name": _f(str, "sgd", choices=("sgd", "adamw")),
        "lr": _f(NUMBER, 0.03, positive=True),
        "momentum": _f(NUMBER, 0.9),
        "nesterov": _f(bool, False),
        "betas": _f(list, [0.9, 0.999]),
        "weight_decay": _f(NUMBER, 0.0),
        "max_grad_norm": _f((*NUMBER, NONE), 1.0),
        # Layer-wise learning-rate decay (BEiT, MAE): each layer below the head at layer_decay times the one above.
        "layer_decay": _f((*NUMBER, NONE), None),
        # SGD's momentum buffers; vit_jax keeps them in bfloat16 (config.optim_dtype), half the memory of float32.
        "momentum_dtype": _f(str, "float32", choices=("float32", "bfloat16")),
    },
    "schedule": {
        "name": _f(str, "cosine", choices=("cosine", "linear")),
        "warmup_steps": _f(int, 500),
        "total_steps": _f(int, 10000, positive=True),
        # The learning rate the linear decay ends at (absolute, as vit_jax's); the cosine decay ends at 0.
        "linear_end": _f(NUMBER, 1e-5),
    },
    "train": {
        "global_batch_size": _f(int, 512, positive=True),
        # "auto": the largest that fits on the device (vit_hf.memory), chosen once and kept on resume.
        "micro_batch_size": _f((int, str), 64),
        "eval_batch_size": _f(int, 128, positive=True),
        "eval_every": _f(int, 100, positive=True),
        "save_every": _f(int, 1000, positive=True),
        "keep_checkpoints": _f(int, 2, positive=True),
        "log_every": _f(int, 10, positive=True),
        "seed": _f(int, 42),
        "mixed_precision": _f(str, "bf16", choices=("no", "fp16", "bf16")),
        "label_smoothing": _f(NUMBER, 0.0),
        "compile": _f(bool, False),
        "gradient_checkpointing": _f(bool, False),
        # An exponential moving average of the weights (vit_hf.ema), evaluated beside them; null: none.
        "ema_decay": _f((*NUMBER, NONE), None),
        # Accelerate's trackers (tensorboard, wandb, mlflow, aim, comet_ml, trackio, ...); [] logs to the jsonl only.
        "report_to": _f(list, ["tensorboard"]),
    },
    "output": {"dir": _f(str, "outputs/run")},
    "hub": {
        "push": _f(bool, False),
        "model_id": _f((str, NONE), None),
        "private": _f(bool, False),
    },
}


class RecipeError(UserError):
    """A field of the recipe that is wrong; FIELD is its dotted path, so a `--set` of it can take the blame."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


# With model.pretrained, the checkpoint fixes the architecture; model.config may still set these.
PRETRAINED_CONFIG_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def _type_names(types: tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    names |= {dict: "an object", NONE: "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _resolve(value: Any, schema: Any, path: str) -> Any:
    """VALUE checked against SCHEMA and completed with defaults."""
    if isinstance(schema, tuple):  # a section that may be null
        section, _ = schema
        return None if value is None else _resolve(value, section, path)
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise RecipeError(path, f"expected an object, got {json.dumps(value)}")
        unknown = sorted(set(value) - set(schema))
        if unknown:
            where = f"{path}.{unknown[0]}" if path else unknown[0]
            raise RecipeError(where, f"unknown field (known: {', '.join(schema)})")
        return {
            key: _resolve(value[key] if key in value else _default(sub), sub, f"{path}.{key}" if path else key)
            for key, sub in schema.items()
        }
    field: Field = schema
    # JSON has no int/float distinction worth refusing, but true is not a number.
    ok = isinstance(value, field.types) and not (isinstance(value, bool) and bool not in field.types)
    if not ok:
        raise RecipeError(path, f"expected {_type_names(field.types)}, got {json.dumps(value)}")
    if field.choices and value not in field.choices:
        raise RecipeError(path, f"expected one of {', '.join(map(str, field.choices))}, got {json.dumps(value)}")
    if field.positive and value is not None and value <= 0:
        raise RecipeError(path, f"must be positive, got {value}")
    return copy.deepcopy(value)


def section_defaults(section: str) -> dict:
    """The default values of one section of the recipe (e.g. `data`), as a complete recipe would have them."""
    return _default(SCHEMA[section])


def _default(schema: Any) -> Any:
    if isinstance(schema, tuple):
        return {key: _default(sub) for key, sub in schema[0].items()}
    if isinstance(schema, dict):
        return {key: _default(sub) for key, sub in schema.items()}
    return copy.deepcopy(schema.default)


def _check_combinations(recipe: dict) -> None:
    train, schedule, data, optim = recipe["train"], recipe["schedule"], recipe["data"], recipe["optim"]
    micro = train["micro_batch_size"]
    if isinstance(micro, str) and micro != "auto" or isinstance(micro, int) and micro <= 0:
        raise RecipeError("train.micro_batch_size", f'expected a positive integer or "auto", got {json.dumps(micro)}')
    if micro != "auto" and train["global_batch_size"] % micro:
        raise RecipeError(
            "train.global_batch_size",
            f"{train['global_batch_size']} is not a multiple of train.micro_batch_size {train['micro_batch_size']}",
        )
    if not 0 <= schedule["warmup_steps"] < schedule["total_steps"]:
        raise RecipeError(
            "schedule.warmup_steps",
            f"must be in [0, schedule.total_steps {schedule['total_steps']}), got {schedule['warmup_steps']}",
        )
    if schedule["linear_end"] < 0:
        raise RecipeError("schedule.linear_end", f"must be 0 or more, got {schedule['linear_end']}")
    if data["train_split"] is None:
        raise RecipeError("data.train_split", "a training run needs a training split")
    if data["num_workers"] < 0:
        raise RecipeError("data.num_workers", f"must be 0 or more, got {data['num_workers']}")
    names = data["class_names"]
    if names is not None and (
        len(names) < 2 or not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) < len(names)
    ):
        raise RecipeError(
            "data.class_names", f"expected two or more distinct, non-empty names, got {json.dumps(names)}"
        )
    if data["streaming"]:
        _check_streaming(data)
    if recipe["hub"]["push"] and not recipe["hub"]["model_id"]:
        raise RecipeError("hub.model_id", "hub.push is true, so a model id (user/name) is needed")
    _check_optim(optim)
    if not 0 <= train["label_smoothing"] < 1:
        raise RecipeError("train.label_smoothing", f"must be in [0, 1), got {train['label_smoothing']}")
    if not 0 <= recipe["model"]["drop_path"] < 1:
        raise RecipeError("model.drop_path", f"must be in [0, 1), got {recipe['model']['drop_path']}")
    if recipe["model"]["lora"] is not None:
        recipe["model"]["lora"] = _check_lora(recipe["model"])
    _check_trackers(train["report_to"])
    if train["ema_decay"] is not None and not 0 < train["ema_decay"] < 1:
        raise RecipeError("train.ema_decay", f"must be in (0, 1) or null, got {train['ema_decay']}")
    if data["augment"] is not None:
        _check_augment(data["augment"])
    _check_model(recipe["model"])


def _check_optim(optim: dict) -> None:
    """The ranges of the `optim` fields the schema cannot state."""
    if optim["max_grad_norm"] is not None and optim["max_grad_norm"] <= 0:
        raise RecipeError("optim.max_grad_norm", f"must be positive or null, got {optim['max_grad_norm']}")
    if len(optim["betas"]) != 2 or not all(0 <= b < 1 for b in optim["betas"]):
        raise RecipeError("optim.betas", f"expected two numbers in [0, 1), got {optim['betas']}")
    if optim["momentum_dtype"] != "float32" and optim["name"] != "sgd":
        raise RecipeError("optim.momentum_dtype", f"bfloat16 is for SGD only, optim.name is {optim['name']}")
    if optim["layer_decay"] is not None and not 0 < optim["layer_decay"] <= 1:
        raise RecipeError("optim.layer_decay", f"must be in (0, 1] or null, got {optim['layer_decay']}")


def _check_model(model: dict) -> None:
    """What the recipe alone says about the model: the patch must tile the image, and a pretrained checkpoint fixes
    the architecture (model.config may set its dropouts only)."""
    pretrained, config = model["pretrained"], model["config"]
    if pretrained is not None:
        for name in config:
            if name not in PRETRAINED_CONFIG_FIELDS:
                raise RecipeError(
                    f"model.config.{name}",
                    f"fixed by the pretrained checkpoint {pretrained!r}; with model.pretrained, model.config may "
                    f"set only {', '.join(PRETRAINED_CONFIG_FIELDS)} (or set model.pretrained to null)",
                )
        if "hidden_dropout_prob" in config and model["dropout"]:
            raise RecipeError("model.config.hidden_dropout_prob", "model.dropout sets the same rate: set only one")
    for name in PRETRAINED_CONFIG_FIELDS:
        rate = config.get(name, 0.0)
        if not isinstance(rate, NUMBER) or isinstance(rate, bool) or not 0 <= rate < 1:
            raise RecipeError(f"model.config.{name}", f"expected a number in [0, 1), got {json.dumps(rate)}")
    patch = config.get("patch_size") if pretrained is None else catalog_patch_size(pretrained)
    if patch and model["image_size"] % patch:
        raise RecipeError("model.image_size", f"{model['image_size']} is not divisible by the patch size {patch}")


def catalog_patch_size(name: str) -> int | None:
    """The patch size a catalog name states (ViT-B_16: 16, augreg/S_32: 32, R50+ViT-B_16: 16); None for a file,
    URL, folder or Hub id, whose patch is known only once loaded."""
    match = re.fullmatch(r"(?:[\w-]+/)?(?:R50\+)?(?:ViT-)?(?:Ti|S|B|L|H)_(\d+)(?:-\d+)?", name)
    return int(match.group(1)) if match else None


def _check_augment(augment: dict) -> None:
    """The ranges of the `data.augment` fields the schema cannot state."""
    scale = augment["crop_scale"]
    if scale is not None and not (
        len(scale) == 2 and all(isinstance(s, NUMBER) for s in scale) and 0 < scale[0] <= scale[1] <= 1
    ):
        raise RecipeError("data.augment.crop_scale", f"expected [min, max] with 0 < min <= max <= 1, got {scale}")
    if augment["rand_augment"] is not None and augment["trivial_augment"]:
        raise RecipeError("data.augment.trivial_augment", "choose RandAugment or TrivialAugment, not both")
    rand = augment["rand_augment"]
    if rand is not None and (set(rand) - {"num_ops", "magnitude"}):
        raise RecipeError(
            "data.augment.rand_augment", f"unknown field {sorted(set(rand) - {'num_ops', 'magnitude'})[0]}"
        )
    for key in ("random_erasing", "mix_prob", "switch_prob"):
        if not 0 <= augment[key] <= 1:
            raise RecipeError(f"data.augment.{key}", f"must be in [0, 1], got {augment[key]}")
    for key in ("mixup_alpha", "cutmix_alpha"):
        if augment[key] < 0:
            raise RecipeError(f"data.augment.{key}", f"must be 0 (off) or positive, got {augment[key]}")


def _check_streaming(data: dict) -> None:
    """A streamed data set has no length: its splits are names or absolute rows, and no class can be counted."""
    from vit_hf.data.splits import parse_split

    if data["examples_per_class"] is not None:
        raise RecipeError("data.examples_per_class", "drawing rows of each class needs the whole split, not a stream")
    for field in SPLIT_FIELDS.values():
        if data[field] is not None:
            parse_split(data[field], f"data.{field}")


def _check_lora(model: dict) -> dict:
    """The `model.lora` section checked and completed with its defaults."""
    lora = _resolve(model["lora"], LORA, "model.lora")
    if model["pretrained"] is None:
        raise RecipeError("model.lora", "adapters fine-tune a pretrained model, and model.pretrained is null")
    if not 0 <= lora["dropout"] < 1:
        raise RecipeError("model.lora.dropout", f"must be in [0, 1), got {lora['dropout']}")
    targets = lora["target_modules"]
    if not targets:
        raise RecipeError("model.lora.target_modules", f"name at least one of {', '.join(LORA_TARGETS)}")
    for name in targets:
        if name not in LORA_TARGETS:
            raise RecipeError(
                "model.lora.target_modules",
                f"{json.dumps(name)} is not a Linear layer of transformers' ViTLayer ({', '.join(LORA_TARGETS)})",
            )
    return lora


def _check_trackers(report_to: list) -> None:
    from accelerate.utils import LoggerType

    known = [kind.value for kind in LoggerType if kind.value != "all"]
    for name in report_to:
        if name not in known:
            raise RecipeError(
                "train.report_to", f"{json.dumps(name)} is not a tracker Accelerate has ({', '.join(known)})"
            )


def apply_override(recipe: dict, assignment: str) -> None:
    """Apply one `key.sub=value` (value parsed as JSON, else taken as a string) to the raw recipe."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: expected key.sub=value")
    dotted, raw = assignment.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    keys = dotted.split(".")
    node = recipe
    for depth, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            above = ".".join(keys[: depth + 1])
            raise UserError(f"--set {assignment}: {above} is {json.dumps(node)}, not an object; set it whole")
    node[keys[-1]] = value


def resolve_recipe(raw: dict, overrides: list[str] = ()) -> dict:
    """The complete, checked recipe from a raw one and `key.sub=value` overrides."""
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    recipe = _resolve(raw, SCHEMA, "")
    _check_combinations(recipe)
    return recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """Read, override, complete and check the recipe at PATH."""
    path, overrides = Path(path), list(overrides)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe file") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    for assignment in overrides:  # before the try: an error here names the --set, not the file
        apply_override(raw, assignment)
    try:
        return resolve_recipe(raw)
    except RecipeError as error:
        raise UserError(f"{_blamed(error, overrides, path)}: {error}") from None
    except UserError as error:
        raise UserError(f"{path}: {error}") from None


def _blamed(error: RecipeError, overrides: list[str], path: Path) -> str:
    """Who gave the bad value: the last `--set` of the field (or of a section above it), else the last `--set` of a
    field the error names (a combination of two), else the recipe file."""
    keys = [assignment.split("=", 1)[0] for assignment in overrides]
    for key, assignment in reversed(list(zip(keys, overrides, strict=True))):
        if error.field == key or error.field.startswith(key + "."):
            return f"--set {assignment}"
    for key, assignment in reversed(list(zip(keys, overrides, strict=True))):
        if re.search(rf"\b{re.escape(key)}\b", str(error)):
            return f"--set {assignment}"
    return str(path)


def accumulation_steps(recipe: dict, num_processes: int) -> int:
    """global_batch_size = micro_batch_size x processes x accumulation steps; refuse an impossible split."""
    train = recipe["train"]
    per_step = train["micro_batch_size"] * num_processes
    if train["global_batch_size"] % per_step:
        raise RecipeError(
            "train.global_batch_size",
            f"{train['global_batch_size']} is not divisible by micro_batch_size "
            f"{train['micro_batch_size']} x {num_processes} processes",
        )
    return train["global_batch_size"] // per_step
