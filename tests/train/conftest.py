"""Fixtures of the trainer tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def context_parallel_launch(tiny_hf_dirs):
    """The per-rank results of ONE 4-process launch that runs the context-parallel checks of
    test_policy_update_cp.py ("update") and test_context_parallel_steps.py ("steps") on the tiny
    Qwen2 (starting four processes costs more than either check)."""
    from distributed import run_distributed
    from test_context_parallel_steps import context_parallel_worker

    return run_distributed(context_parallel_worker, 4, tiny_hf_dirs["qwen2"], timeout_s=1200)
