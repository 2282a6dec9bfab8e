"""Evaluation over a split on any number of processes, every sample counted exactly once; and the run's `Evaluator`,
which scores minival and test during training and keeps the best model on minival."""

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from vit_hf.data.transforms import DeviceTransform
from vit_hf.models.lora import exportable
from vit_hf.publish.model_dir import load_model_dir, save_model_dir
from vit_hf.training.checkpoint import Progress
from vit_hf.training.run_log import RunLog


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
    result["samples"] = samples = len(result["index"])
    correct = int(np.count_nonzero(result["predictions"] == result["labels"]))  # of the gathered rows, each once
    result["accuracy"] = correct / samples if samples else float("nan")
    result["loss_mean"] = float(result["loss"].mean())
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


class Evaluator:
    """Scores models on the run's evaluation loaders ("eval", minival, and "test", either may be missing), logging
    each score at the current step, and keeps the best model on minival in the folder BEST.

    Saving a model gathers its weights, a collective under FSDP: every process calls `keep_best` and `exported`.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        loaders: dict[str, Iterable[dict]],
        image_size: int,
        log: RunLog,
        progress: Progress,
        best: Path,
    ) -> None:
        self.accelerator, self.loaders, self.log, self.progress, self.best = accelerator, loaders, log, progress, best
        self.transform = DeviceTransform(image_size, train=False)

    @property
    def has_minival(self) -> bool:
        return "eval" in self.loaders

    def evaluate(self, split: str, model: torch.nn.Module, log_as: str | None = None) -> dict:
        """MODEL on the eval or test split, logged under LOG_AS (default: the split's name)."""
        with self.accelerator.autocast():
            result = evaluate_split(model, self.loaders[split], self.transform, self.accelerator)
        self.log.eval(log_as or split, self.progress.step, result["accuracy"], result["loss_mean"])
        return result

    def keep_best(self, model: torch.nn.Module, average: torch.nn.Module | None = None) -> float:
        """Minival of the training weights (the prepared MODEL) and of their AVERAGE (with EMA); a new best on
        minival goes to the best folder, and `Progress` records it. Returns the training weights' accuracy."""
        accuracy = {"raw": self.evaluate("eval", model)["accuracy"]}
        if average is not None:
            accuracy["ema"] = self.evaluate("eval", average, log_as="eval_ema")["accuracy"]
        weights = max(accuracy, key=accuracy.get)  # the raw weights on a tie: the first key
        progress = self.progress
        if accuracy[weights] > progress.best_accuracy:
            progress.best_accuracy, progress.best_step, progress.best_weights = (
                accuracy[weights],
                progress.step,
                weights,
            )
            self._save(model, average if weights == "ema" else None)
        return accuracy["raw"]

    def exported(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model the run exports, loaded whole on every process (scoring it needs no sharded state): the best on
        minival, or without minival the last, the prepared MODEL, saved as the best now."""
        if not self.has_minival or not (self.best / "model.safetensors").exists():
            self._save(model)
        return load_model_dir(self.best).to(self.accelerator.device)

    def score_exported(self, model: torch.nn.Module) -> tuple[dict, dict]:
        """The exported MODEL on every split: the results' fields (`eval_accuracy`, `test_samples`, ...) and each
        split's whole evaluation, by split name."""
        fields, evaluated = {}, {}
        for name in self.loaders:
            # The exported model's minival score is logged apart: the minival curve stays that of the training weights.
            evaluated[name] = result = self.evaluate(name, model, log_as="eval_exported" if name == "eval" else name)
            fields |= {f"{name}_{key}": result[key] for key in ("accuracy", "samples")}
            fields[f"{name}_loss"] = result["loss_mean"]
        return fields, evaluated

    def _save(self, model: torch.nn.Module, average: torch.nn.Module | None = None) -> None:
        """The training weights of the prepared MODEL (gathered: a collective under FSDP, every process takes part),
        or their AVERAGE, into the best folder."""
        accelerator = self.accelerator
        state = None if average is not None else accelerator.get_state_dict(model)
        state = state and {key.removeprefix("_orig_mod."): value for key, value in state.items()}  # train.compile
        if accelerator.is_main_process:
            chosen = average if average is not None else accelerator.unwrap_model(model)
            chosen, state = exportable(chosen, state)  # LoRA merged: the model folder needs no peft
            save_model_dir(chosen, self.best, state_dict=state)
        accelerator.wait_for_everyone()
