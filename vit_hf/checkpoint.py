"""The run's state on disk: where it stands (`Progress`), the full checkpoints in `output.dir/checkpoints/step_N`,
the best model on minival, resume, and pruning.

A checkpoint is written under a temporary name and renamed when every process has written its part, so a kill never
leaves a checkpoint that looks complete but is not; the last `keep` checkpoints are kept.
"""

import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from vit_hf.errors import UserError
from vit_hf.files import fsync_path

STEP_PREFIX = "step_"


class Progress:
    """Where the run stands; saved in every checkpoint (through `register_for_checkpointing`)."""

    def __init__(self) -> None:
        self.step = 0  # optimizer updates done
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of this process consumed in the current epoch
        self.best_accuracy = -1.0
        self.best_step = 0
        self.best_weights = "raw"  # or "ema": which weights the best model is
        self.skipped_updates = 0  # fp16 steps the gradient scaler skipped
        self.skipped_images = 0

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


def resolve_resume(checkpoints: Path, resume: str | None) -> Path | None:
    """The checkpoint that `--resume RESUME` names ('auto': the latest, if any); refuse to overwrite a run."""
    if resume == "auto":
        return latest_checkpoint(checkpoints)
    if resume is not None:
        path = Path(resume)
        if not (path / "custom_checkpoint_0.pkl").exists():
            raise UserError(f"--resume {resume}: not a checkpoint folder of this project")
        return path
    if latest_checkpoint(checkpoints) is not None:
        raise UserError(
            f"output.dir {checkpoints.parent} already holds checkpoints: pass --resume auto, or choose another dir"
        )
    return None


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
        final, staging = self.dir / f"{STEP_PREFIX}{step}", self.dir / f".{STEP_PREFIX}{step}.tmp"
        if accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        torch.save(self.generator.get_state(), self._rng_file(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for path in staging.iterdir():
                fsync_path(path)
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            fsync_path(self.dir)
            others = sorted((s, p) for s, p in checkpoint_steps(self.dir).items() if s != step)
            older = [p for s, p in others if s < step]
            for path in [p for s, p in others if s > step] + older[: max(0, len(older) - (self.keep - 1))]:
                shutil.rmtree(path)
        accelerator.wait_for_everyone()
        return final

    def resume(self, path: Path) -> None:
        """Restore every process's state from the checkpoint at PATH."""
        rng = self._rng_file(path)
        if not rng.is_file():
            raise UserError(f"--resume {path}: the checkpoint lacks {rng.name} (written by a different process count?)")
        self.accelerator.load_state(str(path))
        self.generator.set_state(torch.load(rng, weights_only=True))
