"""Clean exits on preemption: SIGTERM / SIGUSR1 make every rank save a checkpoint and stop.

Slurm sends SIGUSR1 (``#SBATCH --signal=USR1@120``) or SIGTERM before killing a job. The
handler only sets a flag; the job polls :meth:`PreemptionFlag.requested` at iteration
boundaries, which all-reduces the flag so that every rank agrees (a signal may reach only some
ranks), then saves and exits with status 0.
"""

from __future__ import annotations

import signal

import torch

from k15_megatron.parallel.device import collective_device


class PreemptionFlag:
    """Records SIGTERM/SIGUSR1 and answers, collectively, whether to stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """True on every rank if any rank received a signal (collective when distributed)."""
        if not torch.distributed.is_initialized():
            return self.received is not None
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32,
                            device=collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
