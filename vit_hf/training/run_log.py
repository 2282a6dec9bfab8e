"""What a run reports while it trains: per-update figures kept on the device between log steps, written to the
trackers (TensorBoard by default) and to the run's own `train_log.jsonl` and `eval_log.jsonl`, from which the model
card's curves are drawn."""

import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from vit_hf.utils.errors import UserError
from vit_hf.utils.fault_points import fault_point
from vit_hf.utils.files import write_text

TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"
# The minival scores of the training weights, logged as the run trains; the exported model's scores (eval_exported,
# test) are logged by the finish, which a resume of a finished or half-finished run does again.
TRAINING_SPLITS = ("eval", "eval_ema")


class UpdateWindow:
    """The figures of the updates since the last log step, kept as device tensors: recording them never waits for
    the device; `reduce` synchronises once per log step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.grad_norm = torch.zeros((), device=device)
        self._reset()

    def _reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.micro: list[torch.Tensor] = []
        self.skipped = torch.zeros((), device=self.device, dtype=torch.long)
        self.skipped_rows: list[torch.Tensor] = []
        self.nonfinite = torch.zeros((), device=self.device, dtype=torch.bool)
        self.data_seconds = 0.0
        self.started = time.perf_counter()

    def add_micro(self, loss: torch.Tensor, skipped_rows: torch.Tensor) -> None:
        """A micro-batch's loss and the rows its loader skipped (bad_images "skip"): their count is known here."""
        self.micro.append(loss)
        if skipped_rows.numel():
            self.skipped += skipped_rows.numel()
            self.skipped_rows.append(skipped_rows)
        self.nonfinite |= ~torch.isfinite(loss)

    def end_update(self, lr: float) -> None:
        self.losses.append(torch.stack(self.micro).mean())
        self.grad_norms.append(torch.as_tensor(self.grad_norm, device=self.device, dtype=torch.float32))
        self.lrs.append(lr)
        self.micro = []

    def reduce(self, accelerator: Accelerator, global_batch: int) -> dict:
        """One collective for the whole window: losses averaged over processes, the flag and the count summed."""
        packed = torch.cat([torch.stack(self.losses), self.nonfinite.float().view(1), self.skipped.float().view(1)])
        packed = accelerator.reduce(packed, "sum") if accelerator.num_processes > 1 else packed
        n = len(self.losses)
        values = packed.tolist()  # waits for the device: the window's time includes its queued work
        seconds = time.perf_counter() - self.started
        report = {
            "losses": [v / accelerator.num_processes for v in values[:n]],
            "nonfinite": values[n] > 0 or not all(math.isfinite(v) for v in values[:n]),
            "skipped_images": int(values[n + 1]),
            # Which rows, of every process: a broken image is read again each epoch, and counted once.
            "skipped_rows": self._all_skipped_rows(accelerator) if values[n + 1] else [],
            "grad_norms": torch.stack(self.grad_norms).tolist(),
            "lrs": self.lrs,
            "lr": self.lrs[-1],
            "images_per_second": n * global_batch / seconds,
            "data_wait_share": self.data_seconds / seconds,
        }
        self._reset()
        return report

    def _all_skipped_rows(self, accelerator: Accelerator) -> list[int]:
        """The rows skipped in the window on any process (a collective: every process calls it, or none)."""
        rows = torch.cat(self.skipped_rows).tolist() if self.skipped_rows else []
        return sorted(set(gather_object(rows) if accelerator.num_processes > 1 else rows))


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as file:
        file.write("".join(json.dumps(row) + "\n" for row in rows))


def read_rows(path: Path) -> list[dict]:
    """The rows of a jsonl log at PATH (none where it is absent). A torn last line, from a kill or a full disk in the
    middle of a write, is left out; a damaged line elsewhere is a one-line UserError."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise UserError(f"{path}, line {number}: not a JSON row: the log is damaged") from None
    return rows


def _truncate(path: Path, last_step: int) -> None:
    """Drop the rows after LAST_STEP, which a resumed run redoes, the exported model's scores, which its finish
    logs again, and a torn last line; atomically."""
    if path.exists():
        rows = [
            row
            for row in read_rows(path)
            if row["step"] <= last_step and ("split" not in row or row["split"] in TRAINING_SPLITS)
        ]
        write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


class RunLog:
    """Per-update and evaluation figures to the trackers and to OUT's jsonl logs (main process only)."""

    def __init__(self, out: Path, resumed_step: int, accelerator: Accelerator) -> None:
        self.out, self.accelerator = out, accelerator
        self.is_main = accelerator.is_main_process
        if self.is_main:
            for name in (TRAIN_LOG, EVAL_LOG):
                _truncate(out / name, resumed_step)

    def train(self, report: dict, first_step: int) -> None:
        """The window's updates, one row each; the last row also carries the window's speed and its wall time."""
        if not self.is_main:
            return
        rows = [
            {"step": first_step + i, "loss": loss, "grad_norm": grad_norm, "lr": lr}
            for i, (loss, grad_norm, lr) in enumerate(
                zip(report["losses"], report["grad_norms"], report["lrs"], strict=True)
            )
        ]
        for row in rows:
            self.accelerator.log({f"train/{key}": row[key] for key in ("loss", "grad_norm", "lr")}, step=row["step"])
        speed = {key: report[key] for key in ("images_per_second", "data_wait_share")}
        self.accelerator.log({f"train/{key}": value for key, value in speed.items()}, step=rows[-1]["step"])
        rows[-1] |= speed | {"time": time.time()}
        _append(self.out / TRAIN_LOG, rows)
        fault_point("logged")

    def eval(self, split: str, step: int, accuracy: float, loss: float) -> None:
        self.accelerator.log({f"{split}/accuracy": accuracy, f"{split}/loss": loss}, step=step)
        if self.is_main:
            _append(self.out / EVAL_LOG, [{"step": step, "split": split, "accuracy": accuracy, "loss": loss}])
            fault_point(f"logged {split}")


def read_run_scalars(out: str | Path) -> dict[str, list[tuple[int, float]]]:
    """The curves of a run's folder from its jsonl logs: tag ("train/loss", "eval/accuracy", ...) -> [(step, value)]
    by step; a step written twice keeps the value written last."""
    series: dict[str, dict[int, float]] = {}
    for name, tags in ((TRAIN_LOG, ("loss",)), (EVAL_LOG, ("accuracy", "loss"))):
        path = Path(out) / name
        if not path.exists():
            continue
        for row in read_rows(path):
            prefix = row.get("split", "train")
            for tag in tags:
                series.setdefault(f"{prefix}/{tag}", {})[row["step"]] = row[tag]
    return {tag: sorted(points.items()) for tag, points in series.items()}
