"""What a finished training run leaves in output.dir: the exported model's files, results.json, the model card and
TensorBoard pictures; and its push to the Hub where the recipe asks for one."""

import time
from pathlib import Path

import torch
from accelerate import Accelerator

from vit_hf.data.sources import DataSplits
from vit_hf.publish.card import write_model_card
from vit_hf.publish.hub import push_to_hub
from vit_hf.publish.model_dir import MODEL_FILES
from vit_hf.publish.run_pictures import log_prediction_pictures
from vit_hf.utils.files import atomic_files_into, link_or_copy, write_json


class RunExport:
    """The output folder of a run of RECIPE on SPLITS, which started at STARTED (on the `time.perf_counter` clock)."""

    def __init__(self, recipe: dict, splits: DataSplits, accelerator: Accelerator, started: float) -> None:
        self.recipe, self.splits, self.accelerator, self.started = recipe, splits, accelerator, started
        self.out = Path(recipe["output"]["dir"])

    def write(self, best: Path, model: torch.nn.Module, results: dict, evaluated: dict, finish_started: float) -> None:
        """The files of the model folder BEST (MODEL, loaded), its pictures (from EVALUATED, its evaluation by split),
        results.json and the card, written by the main process; RESULTS gain `wall_seconds` and `finish_seconds`."""
        if not self.accelerator.is_main_process:
            return
        with atomic_files_into(self.out) as staging:
            for name in MODEL_FILES:
                link_or_copy(best / name, staging / name)
        log_prediction_pictures(self.recipe, self.splits, self.accelerator, model, evaluated)
        results["wall_seconds"] = time.perf_counter() - self.started
        write_json(self.out / "results.json", results)  # the card reads it
        write_model_card(self.out)
        results["finish_seconds"] = time.perf_counter() - finish_started
        write_json(self.out / "results.json", results)

    def push(self) -> None:
        """The output folder to the Hub, if the recipe's `hub.push` asks (main process only); called after
        `end_training`, so that the trackers' files are closed."""
        hub = self.recipe["hub"]
        if hub["push"] and self.accelerator.is_main_process:
            self.accelerator.print(f"pushed: {push_to_hub(self.out, hub['model_id'], private=hub['private'])}")
