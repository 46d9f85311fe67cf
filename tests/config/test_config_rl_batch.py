"""An RL configuration that would leave iterations idle is refused before any process starts.

Each iteration trains on a multiple of data-parallel size x rl.updates_per_iteration finished
groups, so rl.prompts_per_iteration must be such a multiple; the message names
rl.prompts_per_iteration, rl.updates_per_iteration, the DP size and the nearest valid value.
rl.groups_per_micro_batch is only a memory bound and takes no part in the rule.
"""

from __future__ import annotations

import os

from tooling import REPO_ROOT

from k15_megatron.config import load_config
from k15_megatron.config.validate import rl_job_errors

TINY = os.path.join(REPO_ROOT, "examples", "tiny.yaml")


def test_k15_rl_refuses_prompts_that_do_not_split_over_ranks_and_updates(capsys):
    from k15_megatron.jobs.rl import main

    status = main([TINY, "parallel.world_size=2", "rl.prompts_per_iteration=15", "rl.updates_per_iteration=2",
                   "rl.groups_per_micro_batch=8"])
    err = capsys.readouterr().err
    assert status == 2
    [line] = [text for text in err.splitlines() if "rl.prompts_per_iteration=15" in text]
    assert "rl.updates_per_iteration=2" in line and "data-parallel size 2" in line, err
    assert "set rl.prompts_per_iteration=16" in line, err


def test_the_data_parallel_size_comes_from_the_layout():
    def errors(*overrides):
        return rl_job_errors(load_config(TINY, list(overrides), environ={}))

    # world 4 over tensor 2: DP 2; x 3 updates = 6; 20 is nearest to 18
    [msg] = errors("parallel.world_size=4", "parallel.tensor=2", "rl.prompts_per_iteration=20",
                   "rl.updates_per_iteration=3")
    assert "data-parallel size 2 = 6" in msg and "set rl.prompts_per_iteration=18" in msg, msg
    # fewer prompts than one unit: the nearest valid value is the unit itself
    [msg] = errors("parallel.world_size=4", "rl.prompts_per_iteration=3", "rl.updates_per_iteration=2")
    assert "data-parallel size 4 = 8" in msg and "set rl.prompts_per_iteration=8" in msg, msg
    # the configuration of the report (DP 2, 2 updates, 8 groups per micro-batch, 16 prompts) is valid
    assert errors("parallel.world_size=2", "rl.prompts_per_iteration=16", "rl.updates_per_iteration=2",
                  "rl.groups_per_micro_batch=8") == []
    assert errors("parallel.world_size=2", "parallel.tensor=2", "rl.prompts_per_iteration=3") == []
