"""Evaluation over a split on any number of processes, every sample counted exactly once."""

import functools
import os
from collections.abc import Callable, Iterable

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator


def gloo_on_cpu() -> bool:
    """Several processes and no GPU (`accelerate launch --multi_gpu`, torchrun): Accelerate must be told to use
    the CPU, or each process runs alone; with cpu=True it joins them with gloo."""
    return "LOCAL_RANK" in os.environ and not torch.cuda.is_available()


@functools.cache
def accuracy_metric() -> type:
    """Top-1 accuracy as an `evaluate` metric class defined here, so that it works offline (no script from the Hub).

    `evaluate` is imported at the first evaluation, not with this module: it brings transformers' pipelines and
    scipy.stats, about 1.3 s of import on the 2-core machine, which a run that never evaluates need not pay.
    """
    import evaluate

    class Accuracy(evaluate.Metric):
        def _info(self) -> evaluate.MetricInfo:
            return evaluate.MetricInfo(
                description="Fraction of predictions equal to the reference label.",
                citation="",
                inputs_description="predictions and references: class ids",
                features=datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
            )

        def _compute(self, predictions, references) -> dict:
            return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}

    return Accuracy


def evaluate_split(
    model: torch.nn.Module,
    loader: Iterable[dict],
    transform: Callable[[torch.Tensor], torch.Tensor],
    accelerator: Accelerator,
    top_k: int = 5,
) -> dict:
    """Accuracy, mean loss and per-sample predictions over LOADER, gathered from every process.

    Accelerate pads the last batches of a split that does not divide evenly by repeating samples; gathering the
    row index with each prediction and keeping each index once makes the count exact for any process count.
    Returns numpy arrays `index`, `labels`, `predictions`, `top_k` and `loss` sorted by row, and `accuracy`,
    `loss_mean`, `samples`.
    """
    was_training = model.training
    model.eval()
    local: dict[str, list[torch.Tensor]] = {"index": [], "labels": [], "top_k": [], "loss": []}
    with torch.inference_mode():
        for batch in loader:
            logits = model(pixel_values=transform(batch["pixels"])).logits.float()
            local["index"].append(batch["index"])
            local["labels"].append(batch["labels"])
            local["top_k"].append(logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices)
            local["loss"].append(F.cross_entropy(logits, batch["labels"], reduction="none"))
    model.train(was_training)
    # Accelerate's even_batches gives every process at least one batch, so no list is empty.
    stacked = {key: torch.cat(values).to(accelerator.device) for key, values in local.items()}
    result = gather_rows(stacked, accelerator)
    result["predictions"] = result["top_k"][:, 0]
    metric = accuracy_metric()()
    result["accuracy"] = metric.compute(predictions=result["predictions"], references=result["labels"])["accuracy"]
    result["loss_mean"] = float(result["loss"].mean())
    result["samples"] = len(result["index"])
    return result


def gather_rows(local: dict[str, torch.Tensor], accelerator: Accelerator) -> dict[str, np.ndarray]:
    """This process's rows (tensors of one length on the device, row numbers in `index`) and every other
    process's, as numpy arrays sorted by row, each row once, on every process.

    Processes may hold different counts (a skipped image, an uneven split): pad, gather, then drop the pads and
    the samples Accelerate repeated to even out the last batches.
    """
    gathered = {
        key: accelerator.gather(accelerator.pad_across_processes(value, dim=0, pad_index=-1)).cpu()
        for key, value in local.items()
    }
    index = gathered["index"].numpy()
    valid = index >= 0
    _, first = np.unique(index[valid], return_index=True)
    take = np.flatnonzero(valid)[first]
    return {key: value.numpy()[take] for key, value in gathered.items()}
