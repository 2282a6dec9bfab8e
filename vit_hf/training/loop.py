"""The training loop of `vit_hf.finetune`: one `FineTune` object a run, in torchtune's recipe shape.

`__init__` sets everything up, `train` runs the updates (`update` is one accumulation window, in the order of a
training step; `at_boundary` logs, evaluates, saves, stops), and `finish` exports the best model, scores the test
split and writes the card. Its collaborators, each in a module of its own:

- `make_accelerator` (training.accelerator): processes, precision, accumulation, FSDP;
- `make_loaders`, `micro_batches` (training.batches): the splits' loaders, the training data as one endless stream;
- `Checkpointer` (training.checkpoint): the full state of every process, saved and resumed;
- `Evaluator` (training.evaluation): minival and test scores, the best model on minival in checkpoints/best;
- `RunLog`, `UpdateWindow` (training.run_log): the figures of each update, to the trackers and the jsonl logs;
- `StopSignals` (training.signals): SIGTERM and Ctrl-C, agreed by every process;
- `training_results` (training.results) and `RunExport` (publish.run_export): results.json, the exported model's
  folder, its card and pictures.
"""

import copy
import gc
import json
import math
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from vit_hf.data.inputs import TrainInputs
from vit_hf.data.sources import load_splits
from vit_hf.models.build import build_model
from vit_hf.models.lora import add_lora
from vit_hf.models.stochastic_depth import add_stochastic_depth
from vit_hf.publish.run_export import RunExport
from vit_hf.recipe import accumulation_steps
from vit_hf.training.accelerator import local_part, make_accelerator
from vit_hf.training.batches import make_loaders, micro_batches, window_weights
from vit_hf.training.checkpoint import Checkpointer, Progress, latest_checkpoint, resolve_resume
from vit_hf.training.disk_full import disk_full_stops
from vit_hf.training.ema import WeightAverage
from vit_hf.training.evaluation import Evaluator
from vit_hf.training.memory import find_micro_batch
from vit_hf.training.optim import head_lr, make_optimizer, make_schedule
from vit_hf.training.results import training_results
from vit_hf.training.run_folder import claim_run_folder, main_decides, release_run_folder
from vit_hf.training.run_log import RunLog, UpdateWindow
from vit_hf.training.signals import StopSignals
from vit_hf.utils.errors import RunError
from vit_hf.utils.fault_points import fault_point
from vit_hf.utils.files import write_json


class FineTune:
    """One training run of a recipe: set up, train, finish."""

    def __init__(self, recipe: dict, resume: str | None = None) -> None:
        self.started = time.perf_counter()
        self.recipe = recipe = copy.deepcopy(recipe)  # "auto" fields are filled in below
        self.cfg = recipe["train"]
        self.out = Path(recipe["output"]["dir"])
        self.accelerator = accelerator = make_accelerator(recipe)
        self.accumulation = accelerator.gradient_accumulation_steps  # set again where the micro-batch is "auto"
        claim_run_folder(accelerator, self.out)  # one run a folder, before anything reads or writes it
        resume_path = main_decides(accelerator, lambda: resolve_resume(self.out / "checkpoints", resume))
        set_seed(self.cfg["seed"])
        self._prepare_model(self._build_model())
        self.auto_micro_batch = self.cfg["micro_batch_size"] == "auto"
        if self.auto_micro_batch:  # measured on the model as it trains: extras on, wrapped, its average in memory
            self._choose_micro_batch(resume_path)
        train_loader, eval_loaders = self._prepare_loaders()
        # The augmentations' own generator on the device, one stream per process, saved in every checkpoint.
        seed = self.cfg["seed"] * 1_000_003 + accelerator.process_index
        generator = torch.Generator(accelerator.device).manual_seed(seed)
        self.inputs = TrainInputs(recipe, len(self.splits.class_names), generator)
        self.checkpointer = Checkpointer(accelerator, self.out / "checkpoints", self.cfg["keep_checkpoints"], generator)
        if resume_path is not None:
            epoch_batches = 0 if self.splits.streaming else len(train_loader)  # a stream has no length
            self.checkpointer.resume(resume_path, self.progress, recipe, epoch_batches)
            accelerator.print(f"resumed from {resume_path} at step {self.progress.step}")
        self.last_saved = self.progress.step if resume_path is not None else -1
        self.first_step = self.progress.step
        if accelerator.is_main_process:
            write_json(self.out / "recipe.json", recipe)
        accelerator.init_trackers("runs")
        self.log = RunLog(self.out, self.progress.step, accelerator)
        image_size, best = recipe["model"]["image_size"], self.checkpointer.dir / "best"
        self.evaluator = Evaluator(accelerator, eval_loaders, image_size, self.log, self.progress, best)
        self.stream = micro_batches(
            train_loader, self.progress, accelerator, self.cfg["micro_batch_size"], self.splits.streaming
        )
        self.window = UpdateWindow(accelerator.device)
        self.uneven = recipe["data"]["bad_images"] == "skip" or self.splits.streaming  # micro-batches may be short
        self.max_norm = recipe["optim"]["max_grad_norm"] or math.inf

    def _build_model(self) -> torch.nn.Module:
        """The data set's splits, and the recipe's model on its classes: adapters, drop path, checkpointing."""
        recipe = self.recipe
        with self.accelerator.local_main_process_first():  # downloads land in a cache local to each machine
            self.splits = load_splits(recipe["data"], seed=self.cfg["seed"], streaming_ok=True)
            model = build_model(recipe["model"], self.splits.class_names)
        if recipe["model"]["lora"] is not None:  # before stochastic depth: its hooks go on the adapted layers
            model = add_lora(model, recipe["model"]["lora"])
        if recipe["model"]["drop_path"]:
            add_stochastic_depth(model, recipe["model"]["drop_path"])
        if self.cfg["gradient_checkpointing"]:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _prepare_model(self, model: torch.nn.Module) -> None:
        """Model, optimizer and schedule through `accelerator.prepare`, and the state every checkpoint holds besides
        them (`Progress`, the weight average)."""
        accelerator = self.accelerator
        optimizer = make_optimizer(model, self.recipe["optim"])
        scheduler = make_schedule(optimizer, self.recipe["schedule"])
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.progress = Progress()
        accelerator.register_for_checkpointing(self.progress)
        self.ema = None
        if self.cfg["ema_decay"] is not None:
            self.ema = WeightAverage(accelerator.unwrap_model(self.model), self.cfg["ema_decay"])
            accelerator.register_for_checkpointing(self.ema)

    def _choose_micro_batch(self, resume_path: Path | None) -> None:
        """`train.micro_batch_size: "auto"`: the first run's choice (in its recipe.json) on resume, else the largest
        that fits now; the accumulation follows, so the global batch is unchanged."""
        saved = self.out / "recipe.json"
        if resume_path is not None and saved.is_file():
            micro = json.loads(saved.read_text())["train"]["micro_batch_size"]
        else:
            micro = find_micro_batch(self.model, self.recipe, self.accelerator)
        self.cfg["micro_batch_size"] = micro
        self.accumulation = accumulation_steps(self.recipe, self.accelerator.num_processes)
        self.accelerator.gradient_accumulation_steps = self.accumulation
        self.accelerator.print(f"micro-batch {micro} x {self.accumulation} accumulation steps (auto)")

    def _prepare_loaders(self) -> tuple:
        """The training loader and the evaluation loaders, through `accelerator.prepare` (a stream's position is
        saved in every checkpoint too)."""
        accelerator = self.accelerator
        train_loader, eval_loaders = make_loaders(self.recipe, self.splits, accelerator)
        if self.splits.streaming:  # streams split themselves across the processes (vit_hf.data.streaming), unprepared
            accelerator.register_for_checkpointing(train_loader)  # every process's position (Progress's stays 0)
            return train_loader, eval_loaders
        return accelerator.prepare(train_loader), {name: accelerator.prepare(dl) for name, dl in eval_loaders.items()}

    # ---- Train ---------------------------------------------------------------------------------------------

    def train(self) -> None:
        """Updates until `schedule.total_steps`; a signal saves a checkpoint and exits with 128 + its number."""
        total = self.recipe["schedule"]["total_steps"]
        self.stop = StopSignals(self.accelerator.num_processes)
        self.train_started = time.perf_counter()
        self.model.train()
        bar = tqdm(total=total, initial=self.progress.step, desc="train", disable=not self.accelerator.is_main_process)
        try:
            with bar:
                self.bar = bar
                while self.progress.step < total:
                    self.update()
                    self.at_boundary(last=self.progress.step == total)
        finally:
            self.stop.restore()
        self.train_seconds = time.perf_counter() - self.train_started

    def update(self) -> None:
        """One optimizer update: `accumulation` micro-batches, clipping on the last, then the schedule. The gradient
        is the mean over the images the window holds on every process, however many were skipped (`_window`).

        The loss, the gradient norm and the flags stay on the device until the next log step: in float32 and bf16
        nothing here makes the host wait for the device. In fp16 the gradient scaler does, once an update: its step
        reads the overflow flag to skip the optimizer step (which `optimizer_step_was_skipped` then reports).
        """
        accelerator, model, window = self.accelerator, self.model, self.window
        for batch, weight in self._window():
            with accelerator.accumulate(model):
                loss = self._micro_loss(batch) * weight
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    window.grad_norm = local_part(accelerator.clip_grad_norm_(model.parameters(), self.max_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            window.add_micro(loss.detach(), batch["skipped_rows"])
        if self.ema is not None:
            self.ema.update(accelerator.unwrap_model(model))
        if accelerator.scaler is not None and accelerator.optimizer_step_was_skipped:
            self.progress.skipped_updates += 1
        window.end_update(head_lr(self.scheduler))  # the recipe's lr times the schedule
        self.scheduler.step()
        self.progress.step += 1
        self.bar.update(1)

    def _window(self) -> Iterator[tuple[dict, float | torch.Tensor]]:
        """The update's micro-batches with their weights. Where images may be missing (bad_images "skip", a stream)
        the whole window is read first: each weight depends on the count of the window's images (`window_weights`)."""
        batches = []
        for _ in range(self.accumulation):
            waited = time.perf_counter()
            batches.append(next(self.stream))
            self.window.data_seconds += time.perf_counter() - waited
            if not self.uneven:  # every micro-batch full: each weighs 1
                yield batches.pop(), 1.0
        if self.uneven:
            yield from zip(batches, window_weights(batches, self.accelerator), strict=True)

    def _micro_loss(self, batch: dict) -> torch.Tensor:
        """The mean training loss of a micro-batch. One whose images were all skipped runs a blank image, weighted 0
        by `window_weights`: every process still runs the forward and backward that DDP and FSDP synchronise."""
        if batch["labels"].shape[0] == 0:
            size = self.recipe["model"]["image_size"]
            blank = torch.zeros(1, 3, size, size, device=self.accelerator.device)
            return self.model(pixel_values=blank).logits.float().sum() * 0.0
        images, targets = self.inputs(batch)
        return self.inputs.loss(self.model(pixel_values=images).logits.float(), targets)

    def at_boundary(self, last: bool) -> None:
        """After an update: log, evaluate, save and stop where the recipe or a signal asks, and stop on a NaN."""
        step, cfg = self.progress.step, self.cfg
        fault_point("update", step)
        log_now = step % cfg["log_every"] == 0 or last
        save_now = step % cfg["save_every"] == 0
        eval_now = self.evaluator.has_minival and (step % cfg["eval_every"] == 0 or last)
        stop_requested = self.stop.requested()
        if not (log_now or save_now or eval_now or stop_requested):
            return
        report = self.window.reduce(self.accelerator, cfg["global_batch_size"])
        self.progress.add_skipped(report["skipped_rows"])
        if report["nonfinite"]:
            raise RunError(
                f"the training loss became NaN or infinite by step {step}; the last good checkpoint is "
                f"{latest_checkpoint(self.checkpointer.dir) or 'none'}: lower optim.lr or check the data, "
                "then resume with --resume auto"
            )
        self.log.train(report, step - len(report["losses"]) + 1)
        self.bar.set_postfix(loss=f"{report['losses'][-1]:.4f}", lr=f"{report['lr']:.2e}", refresh=False)
        if eval_now:
            accuracy = self.evaluator.keep_best(self.model, None if self.ema is None else self.ema.model)
            self.bar.set_postfix(eval_acc=f"{accuracy:.4f}", refresh=False)
        if save_now or stop_requested:
            self.save_checkpoint()
        if stop_requested:
            self.accelerator.end_training()
            self.accelerator.print(f"stopped at step {step}; checkpoint saved; continue with --resume auto")
            raise SystemExit(128 + self.stop.signal)

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.progress.step)
        self.last_saved = self.progress.step

    # ---- Finish --------------------------------------------------------------------------------------------

    def finish(self) -> dict:
        """The final checkpoint, the exported model (the best on minival), the test score, results and card."""
        finish_started = time.perf_counter()
        accelerator = self.accelerator
        if self.last_saved != self.progress.step:
            self.save_checkpoint()
        model = self.evaluator.exported(self.model)
        scores, evaluated = self.evaluator.score_exported(model)
        results = self._results() | scores
        export = RunExport(self.recipe, self.splits, accelerator, started=self.started)
        export.write(self.evaluator.best, model, results, evaluated, finish_started)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        export.push()
        accelerator.print(json.dumps({k: v for k, v in results.items() if k != "class_names"}))
        return results

    def _results(self) -> dict:
        return training_results(
            self.recipe, self.splits, self.accelerator, self.model, self.progress,
            updates=self.progress.step - self.first_step, train_started=self.train_started,
            train_seconds=self.train_seconds, micro_batch_auto=self.auto_micro_batch,
        )  # fmt: skip


def run(recipe: dict, resume: str | None = None) -> dict:
    """Train as RECIPE says; returns the results (also written to output.dir/results.json)."""
    out = Path(recipe["output"]["dir"])
    job = world = None
    try:
        with disk_full_stops(out):
            job = FineTune(recipe, resume)
            world = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
            job.train()
            return job.finish()
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)  # their locals hold the job too (a stop, an error)
        raise
    finally:
        # DDP's reducer lets go of its process group holding the GIL. Were it the group's last holder (once the
        # process groups are destroyed), gloo's destructor would wait for gloo's threads, and one of them may still
        # need the GIL to free the last collective's tensors: the process would hang at exit. So the model goes
        # first, and the group last, from Python, whose destructor lets go of the GIL while it waits for them.
        del job
        gc.collect()
        del world
        release_run_folder(out)
