"""Fixtures of the trainer tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def context_parallel_launch(tiny_hf_dirs):
    """{"update": per-rank results, "steps": per-rank results} of ONE 4-process launch that runs
    the context-parallel checks of test_policy_update_cp.py and test_context_parallel_steps.py on
    the tiny Qwen2 (starting four processes costs more than either check)."""
    from distributed import run_cases
    from test_context_parallel_steps import _layouts_worker
    from test_policy_update_cp import update_worker

    hf_dir = tiny_hf_dirs["qwen2"]
    return run_cases(4, {"update": (update_worker, (hf_dir,)), "steps": (_layouts_worker, (hf_dir,))},
                     timeout_s=1200)
