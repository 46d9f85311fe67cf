"""The ``dpo:`` section: direct preference optimisation (``k15 dpo``, PAPER.md section 7).

The pairs come from ``data.train_path`` (:mod:`k15_megatron.data.pairs`); ``data.seq_length``
bounds one sequence (prompt + response), ``data.micro_batch_size`` / ``data.global_batch_size``
count PAIRS per micro-batch / optimizer step, ``optim.train_iters`` the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from k15_megatron.config.fields import at_least


@dataclass
class DPOConfig:
    """The DPO objective and how ``k15 dpo`` builds its pairs."""

    beta: float = at_least(0.1, 0.0)
    """KL strength of the DPO loss (Rafailov et al. 2023, eq. 7; > 0): the implicit reward of a
    response is beta x (its policy log-prob - its reference log-prob)."""
    ratio: float = at_least(1.5, 1.0)
    """Grouped records (``responses`` + ``correct``): a correct response longer than this many
    times the shortest correct one (tokens) is a negative (PAPER.md section 7: 1.5)."""
    sft_loss_weight: float = at_least(0.0, 0.0)
    """Weight of the chosen responses' negative log-likelihood per token added to the DPO loss
    (:func:`k15_megatron.rl.dpo.chosen_nll`; NeMo-RL's ``sft_loss_weight``, TRL's ``rpo_alpha``).
    0: plain DPO. It keeps DPO from lowering the chosen responses' likelihood with the rejected
    ones'."""
    logprob_chunk_tokens: int = at_least(2048, 1)
    """Tokens per chunk of float32 logits in the loss and the reference pass: at most one
    [chunk, vocab/TP] block (and its gradient) is alive, never a micro-batch's full logits."""

    def config_errors(self, prefix: str) -> List[str]:
        if self.beta <= 0:
            return [f"{prefix}.beta={self.beta}: DPO's beta must be > 0 (0.1 is the usual value)"]
        return []
