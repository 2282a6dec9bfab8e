"""Test-only pause points: where tests/training/test_faults.py kills a run, or fills its disk, at a chosen moment.

Inert unless VIT_HF_FAULT_POINT is set (one dictionary look-up a call). The loop and the writers name their moments
`fault_point("save", step)`; a moment's key is its name and the step last named (`save@4`, `replace best@6`).

- VIT_HF_FAULT_POINT=trace: every key passed is appended, one a line, to the file VIT_HF_FAULT_FILE;
- VIT_HF_FAULT_POINT=KEY: at the first pass of KEY the process creates VIT_HF_FAULT_FILE, then waits until the test
  deletes it (to let it go on) or kills it.
"""

import os
import time
from pathlib import Path

_state = {"step": 0}
_PAUSE_SECONDS = 3600.0  # a test that forgets its paused run does not keep it for ever


def fault_point(name: str, step: int | None = None) -> None:
    """The moment NAME (after STEP updates, where given) of a run; see the module's docstring."""
    target = os.environ.get("VIT_HF_FAULT_POINT")
    if target is None:
        return
    if step is not None:
        _state["step"] = step
    key = f"{name}@{_state['step']}"
    marker = Path(os.environ["VIT_HF_FAULT_FILE"])
    if target == "trace":
        with open(marker, "a") as file:
            file.write(key + "\n")
    elif target == key:
        os.environ["VIT_HF_FAULT_POINT"] = "passed"  # the first pass only
        marker.write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + _PAUSE_SECONDS
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
