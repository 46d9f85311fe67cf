"""Clean exits on preemption: SIGTERM / SIGINT / SIGUSR1 make every rank save a checkpoint and stop.

Slurm sends SIGUSR1 (``#SBATCH --signal=USR1@300``) and SIGTERM (time limit, preemption, scancel)
to every process of a job step; Ctrl-C sends SIGINT; ``k15``'s own parent process and torchrun
forward what they receive (:mod:`k15_megatron.parallel.launch` describes each path). The
handler only records the signal; the job polls :meth:`PreemptionFlag.requested` at iteration
boundaries, which all-reduces the record so that every rank agrees (a signal may reach only
some ranks, or reach them at different iterations), then finishes, saves once and exits 0.
"""

from __future__ import annotations

import torch

from k15_megatron.parallel.device import collective_device
from k15_megatron.parallel.launch import record_stop_signals, stop_recording, stop_signal_received


class PreemptionFlag:
    """Records the stop signals from now on and answers, collectively, whether to stop."""

    def __init__(self):
        self._previous = record_stop_signals()

    @property
    def received(self) -> int | None:
        """The first stop signal this process received, or None."""
        return stop_signal_received()

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
        stop_recording(self._previous)
