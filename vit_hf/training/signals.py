"""SIGTERM and Ctrl-C during training: save a checkpoint and stop after the same update on every process."""

import signal

import torch


class StopSignals:
    """SIGTERM and Ctrl-C ask the loop to save and stop after the current update, on every process; `restore` gives
    the handlers back.

    A launcher or a scheduler may signal only some of the processes, and each must stop after the same update: the
    flag travels in a host collective over a gloo group of its own after every update, a few bytes on the network
    that never wait for the GPU (the training's collectives run on NCCL, its queue is left alone).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, processes: int) -> None:
        self.signal: int | None = None
        self._group = torch.distributed.new_group(backend="gloo") if processes > 1 else None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def requested(self) -> bool:
        """Whether any process has been signalled (the same answer on all of them)."""
        if self._group is None:
            return self.signal is not None
        flag = torch.tensor([self.signal or 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        # The answer is the reduced flag alone: a signal arriving after it was read here counts at the next update.
        agreed = int(flag)
        self.signal = self.signal or agreed or None
        return agreed != 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
