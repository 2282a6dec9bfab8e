"""The run's state on disk: where it stands (`Progress`), the full checkpoints in `output.dir/checkpoints/step_N`,
the best model on minival, resume, and pruning.

A checkpoint is written under a temporary name and renamed when every process has written its part, so a kill never
leaves a checkpoint that looks complete but is not; the last `keep` checkpoints are kept. Its `manifest.json`, written
last, records each file's size and checksum: a resume checks the checkpoint against it first, and passes over a damaged
one for the one before (training.checkpoint_files). Each checkpoint holds the best model as of its step
(`step_N/best`, hard links to `checkpoints/best`), so that a resume restores the best model of its own timeline, not
one that a continuation it abandons found later.
"""

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import accelerate.accelerator
import psutil
import torch
from accelerate import Accelerator

from vit_hf.training.checkpoint_files import checkpoint_damage, load_weights_only, write_manifest
from vit_hf.utils.errors import UserError
from vit_hf.utils.fault_points import fault_point
from vit_hf.utils.files import atomic_dir, fsync_path, link_or_copy

STEP_PREFIX = "step_"
BEST = "best"


class Progress:
    """Where the run stands; saved in every checkpoint (through `register_for_checkpointing`)."""

    def __init__(self) -> None:
        self.step = 0  # optimizer updates done
        self.epoch = 0
        # The data position in samples of all processes together, which another process count can continue.
        self.samples_in_epoch = 0
        self.epoch_samples = 0  # the samples of a whole epoch (whole micro-batches on every process)
        self.batches_in_epoch = 0  # micro-batches of each process consumed in the current epoch
        self.best_accuracy = -1.0
        self.best_step = 0
        self.best_weights = "raw"  # or "ema": which weights the best model is
        self.skipped_updates = 0  # fp16 steps the gradient scaler skipped
        self.skipped_images = 0  # distinct training images skipped as undecodable (bad_images "skip")
        self.skipped_rows: list[int] = []  # their rows in the train split: each counts once, however often read

    def add_skipped(self, rows: list[int]) -> None:
        self.skipped_rows = sorted(set(self.skipped_rows).union(rows))
        self.skipped_images = len(self.skipped_rows)

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def checkpoint_steps(checkpoints: Path) -> dict[int, Path]:
    """The complete checkpoints under CHECKPOINTS by step (incomplete ones keep a temporary name)."""
    found = {}
    for path in checkpoints.glob(f"{STEP_PREFIX}*"):
        number = path.name[len(STEP_PREFIX) :]
        if number.isdigit():
            found[int(number)] = path
    return found


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    steps = checkpoint_steps(checkpoints)
    return steps[max(steps)] if steps else None


def latest_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The latest checkpoint that passes its check, with a warning for each later one that does not; None where
    there is none at all, a one-line UserError where every one is damaged."""
    damaged = []
    for _, path in sorted(checkpoint_steps(checkpoints).items(), reverse=True):
        damage = checkpoint_damage(path)
        if damage is None:
            for bad in damaged:
                print(f"warning: passing over the damaged checkpoint {bad}; resuming from {path}", file=sys.stderr)
            return path
        damaged.append(f"{path} ({damage})")
    if damaged:
        raise UserError(
            f"no complete checkpoint to resume from in {checkpoints}: {'; '.join(damaged)}: remove the damaged ones "
            "to start afresh"
        )
    return None


def resolve_resume(checkpoints: Path, resume: str | None) -> Path | None:
    """The checkpoint that `--resume RESUME` names ('auto': the latest complete one, if any), checked; refuse to
    overwrite a run. A run that starts afresh drops the best model that a run killed before its first checkpoint left.

    An attempt that an elastic agent (torchrun --max-restarts) started again after a failure resumes as with 'auto',
    from the checkpoints this job wrote: those older than the agent are another run's, refused as on the first attempt.
    """
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if resume == "auto" or (restarted and resume is None and _written_by_this_job(latest_checkpoint(checkpoints))):
        found = latest_complete_checkpoint(checkpoints)
        return found if found is not None else _afresh(checkpoints)
    if resume is not None:
        path = Path(resume)
        if not (path / "custom_checkpoint_0.pkl").exists():
            raise UserError(f"--resume {resume}: not a checkpoint folder of this project")
        damage = checkpoint_damage(path)
        if damage is not None:
            raise UserError(f"--resume {resume}: the checkpoint is damaged: {damage}")
        return path
    if latest_checkpoint(checkpoints) is not None:
        raise UserError(
            f"output.dir {checkpoints.parent} already holds checkpoints: pass --resume auto, or choose another dir"
        )
    return _afresh(checkpoints)


def _afresh(checkpoints: Path) -> None:
    """A run that starts afresh: the best model a run killed before its first checkpoint left is not this one's."""
    if (checkpoints / BEST).is_dir():
        shutil.rmtree(checkpoints / BEST)


def restart_store() -> dict:
    """`init_process_group` arguments for an attempt that an elastic agent restarted: a store prefix of its own.

    The agent keeps one store for every attempt of a job, and the process group's keys carry no attempt number: a
    restarted group could read the addresses that the dead attempt published there and fail to connect, or hang.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    return {
        "store": torch.distributed.PrefixStore(f"attempt_{attempt}", store),
        "rank": int(os.environ["RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
    }


def _written_by_this_job(checkpoint: Path | None) -> bool:
    """Whether CHECKPOINT was written after this process's elastic agent (its parent) started."""
    return checkpoint is not None and checkpoint.stat().st_mtime >= psutil.Process(os.getppid()).create_time()


def per_process_randomness(recipe: dict) -> str | None:
    """The recipe field that draws random numbers from one stream per process, if any: the draws of such a run
    depend on the process count."""
    model = recipe["model"]
    fields = {"data.augment": recipe["data"]["augment"], "model.dropout": model["dropout"]}
    fields["model.drop_path"] = model["drop_path"]
    fields |= {f"model.config.{key}": value for key, value in model["config"].items() if "dropout" in key}
    fields["model.lora.dropout"] = (model["lora"] or {}).get("dropout")
    return next((field for field, value in fields.items() if value), None)


@contextlib.contextmanager
def _weights_only_custom_states(path: Path) -> Iterator[None]:
    """Accelerate's `load_state` unpickles the registered objects' states (`Progress`, the weight average, a stream's
    position) with weights_only=False, which runs any call pickled in them: while it loads the checkpoint at PATH,
    they come from a weights-only load instead (a one-line refusal for a file that pickles a call)."""
    states = {
        int(file.stem.rsplit("_", 1)[1]): load_weights_only(file) for file in path.glob("custom_checkpoint_*.pkl")
    }

    def load_custom_state(obj: object, input_dir: str, index: int = 0) -> None:
        obj.load_state_dict(states[index])

    original = accelerate.accelerator.load_custom_state
    accelerate.accelerator.load_custom_state = load_custom_state
    try:
        yield
    finally:
        accelerate.accelerator.load_custom_state = original


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint folder, first renamed away: a kill halfway leaves no `step_N` with files missing."""
    retired = checkpoint.with_name(f".{checkpoint.name}.old-removed")
    if retired.exists():
        shutil.rmtree(retired)
    checkpoint.rename(retired)
    shutil.rmtree(retired)


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


class Checkpointer:
    """Saves and restores the whole training state of every process: model, optimizer, scheduler, scaler, RNGs,
    `Progress` (registered with the accelerator) and the augmentation generator."""

    def __init__(self, accelerator: Accelerator, checkpoints: Path, keep: int, generator: torch.Generator) -> None:
        self.accelerator = accelerator
        self.dir = checkpoints
        self.keep = keep
        self.generator = generator

    def _rng_file(self, folder: Path) -> Path:
        return folder / f"augment_rng_{self.accelerator.process_index}.pt"

    def save(self, step: int) -> Path:
        """The full state into checkpoints/step_STEP: written under a temporary name, renamed when complete.

        Checkpoints after STEP belong to a continuation this run abandoned (it resumed from an earlier one), and the
        oldest beyond `keep` are no longer needed: both are removed once the new one is complete.
        """
        accelerator = self.accelerator
        fault_point("save", step)
        final, staging = self.dir / f"{STEP_PREFIX}{step}", self.dir / f".{STEP_PREFIX}{step}.tmp"
        if accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(staging))
            accelerator.wait_for_everyone()
            torch.save(self.generator.get_state(), self._rng_file(staging))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self._complete(staging, final)
        except Exception:
            if accelerator.is_main_process:  # a full disk, say: give back the space, leave no half checkpoint
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if accelerator.is_main_process:
            others = sorted((s, p) for s, p in checkpoint_steps(self.dir).items() if s != step)
            older = [p for s, p in others if s < step]
            for path in [p for s, p in others if s > step] + older[: max(0, len(older) - (self.keep - 1))]:
                _remove(path)
        accelerator.wait_for_everyone()
        return final

    def _complete(self, staging: Path, final: Path) -> None:
        """The main process's part: the best model's links, the manifest (last), then the final name."""
        if (self.dir / BEST).is_dir():
            shutil.copytree(self.dir / BEST, staging / BEST, copy_function=link_or_copy)
        for path in staging.iterdir():
            fsync_path(path)
        fault_point("saved state")
        write_manifest(staging)
        if final.exists():
            _remove(final)
        staging.rename(final)
        fsync_path(self.dir)
        fault_point("renamed")

    def resume(self, path: Path, progress: Progress, recipe: dict, epoch_batches: int) -> None:
        """Restore every process's state from the checkpoint at PATH, and the best model of its timeline.

        The data position is kept in samples of all processes together (in PROGRESS), so a run of RECIPE on another
        process count (EPOCH_BATCHES micro-batches on each process an epoch) continues the same sample stream.
        """
        processes = self.accelerator.num_processes
        batch_samples = recipe["train"]["micro_batch_size"] * processes
        samples, written_by = self._data_position(path, recipe, batch_samples, epoch_batches * batch_samples)
        with _weights_only_custom_states(path):
            self.accelerator.load_state(str(path))
        # Accelerate's count of micro-batches places the ends of accumulation windows: a checkpoint lies at the end of
        # one, in this run's accumulation too (which differs from the writer's on another process count).
        self.accelerator.step = progress.step * self.accelerator.gradient_accumulation_steps
        if written_by == processes:  # else nothing draws from it (`_data_position` refused that)
            self.generator.set_state(load_weights_only(self._rng_file(path)))
        progress.samples_in_epoch, progress.batches_in_epoch = samples, samples // batch_samples
        self._restore_best(path, progress)
        fault_point("resumed", progress.step)

    def _data_position(self, path: Path, recipe: dict, batch_samples: int, epoch_samples: int) -> tuple[int, int]:
        """The checkpoint's position in its epoch (in samples) and the count of processes that wrote it; a one-line
        UserError where this run, with BATCH_SAMPLES a micro-batch on every process, cannot continue it exactly."""
        processes, micro_batch_size = self.accelerator.num_processes, recipe["train"]["micro_batch_size"]
        written_by = len(list(path.glob("augment_rng_*.pt")))  # one a process
        if written_by == 0:
            raise UserError(f"--resume {path}: the checkpoint lacks augment_rng_0.pt (not written by this project?)")
        saved = load_weights_only(path / "custom_checkpoint_0.pkl")
        # A checkpoint from before `samples_in_epoch` counts micro-batches of each process, of this size (as before).
        samples = saved.get("samples_in_epoch", saved["batches_in_epoch"] * batch_samples)
        refusal = f"--resume {path}: written by {_processes(written_by)}, resumed on {_processes(processes)}"
        if written_by != processes and "samples_in_epoch" not in saved:
            raise UserError(
                f"{refusal}: an older checkpoint keeps its data position per process: resume it on "
                f"{_processes(written_by)}"
            )
        randomness = per_process_randomness(recipe)
        if written_by != processes and randomness is not None:
            raise UserError(
                f"{refusal}: {randomness} draws random numbers on each process: resume it on {_processes(written_by)}"
            )
        if saved.get("epoch_samples", epoch_samples) != epoch_samples:
            raise UserError(
                f"{refusal}: an epoch is {saved['epoch_samples']} samples there and {epoch_samples} "
                f"here (whole micro-batches of {micro_batch_size} on each process)"
            )
        if samples % batch_samples:  # only where train.global_batch_size changed since
            raise UserError(
                f"{refusal}: its data position, sample {samples} of epoch {saved['epoch']}, is not a "
                f"multiple of micro-batch {micro_batch_size} x {_processes(processes)}"
            )
        return samples, written_by

    def _restore_best(self, path: Path, progress: Progress) -> None:
        """checkpoints/best as of the checkpoint at PATH: a best found after it belongs to an abandoned continuation.

        A checkpoint without one was saved before any minival (or by an older version: its best is left as it is).
        """
        if self.accelerator.is_main_process:
            kept, best = path / BEST, self.dir / BEST
            if kept.is_dir():
                with atomic_dir(best) as staging:
                    shutil.copytree(kept, staging, copy_function=link_or_copy, dirs_exist_ok=True)
            elif progress.best_accuracy < 0 and best.exists():
                shutil.rmtree(best)
        self.accelerator.wait_for_everyone()
