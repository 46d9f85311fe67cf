"""The per-phase progress line: rewritten in place on a terminal, one line per iteration in logs."""

import io
import time

from k15_megatron.jobs.progress import PhaseProgress, format_rate


def test_log_output_gets_one_finished_line_per_iteration_with_rates():
    out = io.StringIO()
    progress = PhaseProgress("rl", 40, enabled=True, stream=out, live=False)
    progress.start_iteration(3)
    with progress.phase("rollout") as phase:
        time.sleep(0.01)
        phase["tokens"] = 1000
    with progress.phase("reward"):
        pass
    progress.end_iteration()
    text = out.getvalue()
    assert "\r" not in text and text.count("\n") == 1
    line = text.strip()
    assert line.startswith("rl 3/40 | rollout ") and "tok/s | reward " in line
    rate = float(line.split("rollout ")[1].split(" s ")[1].split(" tok/s")[0].removesuffix("k"))
    assert 0 < rate <= 100_000  # 1000 tokens in >= 10 ms


def test_terminal_output_shows_each_phase_while_it_runs_then_clears():
    out = io.StringIO()
    progress = PhaseProgress("rl", 2, enabled=True, stream=out, live=True)
    progress.start_iteration(1)
    with progress.phase("train"):
        assert out.getvalue().endswith("rl 1/2 | train ...")
    progress.end_iteration()
    frames = out.getvalue().split("\r")
    assert any(f.startswith("rl 1/2 | train 0.") for f in frames)
    assert frames[-1] == ""  # the line is blanked, ready for the summary line


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    progress = PhaseProgress("rl", 2, enabled=False, stream=out)
    progress.start_iteration(1)
    with progress.phase("sync"):
        pass
    progress.end_iteration()
    assert out.getvalue() == ""


def test_format_rate():
    assert format_rate(14431.2) == "14.4k tok/s"
    assert format_rate(812.0) == "812 tok/s"


def test_a_phase_note_is_shown_in_parentheses():
    out = io.StringIO()
    progress = PhaseProgress("rl", 2, enabled=True, stream=out, live=False)
    progress.start_iteration(1)
    with progress.phase("reward") as phase:
        phase["note"] = "+0.41 s during rollout"
    progress.end_iteration()
    assert out.getvalue().strip().endswith(" s (+0.41 s during rollout)")
