"""What a training run reports in its results.json, besides the exported model's scores (`Evaluator.score_exported`)
and the wall time of the whole run (the export adds those)."""

import time

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import DynamoBackend

from vit_hf.data.sources import DataSplits
from vit_hf.training.accelerator import hardware, local_part
from vit_hf.training.checkpoint import Progress


def training_results(
    recipe: dict,
    splits: DataSplits,
    accelerator: Accelerator,
    model: torch.nn.Module,
    progress: Progress,
    *,
    updates: int,
    train_started: float,
    train_seconds: float,
    micro_batch_auto: bool,
) -> dict:
    """The run's figures, with the splits' scores None until the exported model's are added. MODEL is the prepared
    model; UPDATES are this session's (a resumed run did the others earlier), done in TRAIN_SECONDS from
    TRAIN_STARTED (on the `time.perf_counter` clock)."""
    cfg, has_eval = recipe["train"], splits.eval is not None
    parameters = list(accelerator.unwrap_model(model).parameters())
    return {
        "step": progress.step,
        "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
        "total_parameters": sum(p.numel() for p in parameters),
        # Under FSDP each process holds a shard: the main process's part of the parameters shows it.
        "main_process_parameters": sum(local_part(p).numel() for p in parameters),
        "distributed": accelerator.distributed_type.value,
        "best_step": progress.best_step if has_eval else progress.step,
        "exported_weights": "ema average" if has_eval and progress.best_weights == "ema" else "trained",
        **{f"{split}_{key}": None for split in ("eval", "test") for key in ("accuracy", "loss")},
        "eval_samples": 0,
        "test_samples": 0,
        "images_seen": progress.step * cfg["global_batch_size"],
        "train_samples_per_second": updates * cfg["global_batch_size"] / train_seconds,
        "startup_seconds": train_started - _process_started_perf(),
        "skipped_updates": progress.skipped_updates,
        "skipped_images": progress.skipped_images,
        "num_processes": accelerator.num_processes,
        "micro_batch_size": cfg["micro_batch_size"],
        "micro_batch_size_auto": micro_batch_auto,
        "accumulation_steps": accelerator.gradient_accumulation_steps,
        "hardware": hardware(accelerator),
        **ran_as(accelerator),
        "base_model": recipe["model"]["pretrained"],
        "dataset": splits.name,
        "train_examples": None if splits.streaming else len(splits.train),  # a stream has no length
        "examples_per_class": recipe["data"]["examples_per_class"],
        "class_names": splits.class_names,
    }


def ran_as(accelerator: Accelerator) -> dict:
    """The precision and compilation the run had: Accelerate's, which its launch settings can change (a DeepSpeed
    config's precision, `accelerate launch --dynamo_backend` where the recipe's train.compile is false)."""
    return {
        "mixed_precision": accelerator.mixed_precision,
        "compiled": accelerator.state.dynamo_plugin.backend != DynamoBackend.NO,
    }


def _process_started_perf() -> float:
    """The process's launch on the `time.perf_counter` clock."""
    return time.perf_counter() - (time.time() - psutil.Process().create_time())
