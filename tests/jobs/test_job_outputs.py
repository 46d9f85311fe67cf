"""The smaller writers never replace a user's file unasked: `k15 tiny --out` continues only a
folder it made, `k15 plot --out` and `tools/gen_code_tests.py --output` refuse an existing file
without --overwrite; each says what it wrote."""

import json
import os

import pytest
from tooling import run_tool

from k15_megatron.jobs import plot
from k15_megatron.jobs.tiny import Stages


def test_tiny_refuses_a_foreign_folder_and_continues_its_own(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my report")
    with pytest.raises(SystemExit, match="k15 tiny did not make"):
        Stages(str(tmp_path / "mine"), fresh=False)
    assert os.listdir(tmp_path / "mine") == ["report.md"]
    Stages(str(tmp_path / "new"), fresh=False)
    Stages(str(tmp_path / "new"), fresh=False)  # its own folder (stages/) is continued


def _stage(stages, name, signature, log, folder):
    def work():
        log.append(name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "state"), "a") as f:
            f.write(signature + "\n")
    return stages.run(name, signature, work, outputs=[folder])


def test_tiny_restarts_a_changed_stage_and_every_later_one_in_fresh_folders(tmp_path):
    out = tmp_path / "tiny"
    a, b = str(out / "a"), str(out / "b")

    def pipeline(sig_a, sig_b, *, fresh=False):
        log, stages = [], Stages(str(out), fresh=fresh)
        _stage(stages, "a", sig_a, log, a)
        _stage(stages, "b", sig_b, log, b)
        return log

    assert pipeline("a1", "b1") == ["a", "b"]
    assert pipeline("a1", "b1") == []  # complete and unchanged: skipped
    # Stage b interrupted (no marker): its folder is kept, so its job resumes.
    os.unlink(out / "stages" / "b.done")
    assert pipeline("a1", "b1") == ["b"]
    assert (out / "b" / "state").read_text() == "b1\nb1\n"
    # A changed command re-runs that stage and the later ones, each in a fresh folder.
    assert pipeline("a2", "b1") == ["a", "b"]
    assert (out / "a" / "state").read_text() == "a2\n" and (out / "b" / "state").read_text() == "b1\n"
    assert pipeline("a2", "b1", fresh=True) == ["a", "b"]
    assert (out / "a" / "state").read_text() == "a2\n"


def test_plot_refuses_an_existing_out_file_and_says_what_it_wrote(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "train/loss": 1.0 / i}) + "\n"
                                               for i in (1, 2, 3)))
    mine = tmp_path / "mine.png"
    mine.write_text("not a plot")
    assert plot.main([str(run), "--out", str(mine)]) == 2
    assert mine.read_text() == "not a plot" and "--overwrite" in capsys.readouterr().err
    assert plot.main([str(run), "--out", str(mine), "--overwrite"]) == 0
    assert f"plot: wrote {mine}" in capsys.readouterr().out and mine.read_bytes().startswith(b"\x89PNG")


def test_gen_code_tests_refuses_an_existing_output(tmp_path):
    (tmp_path / "problems.jsonl").write_text('{"id": "p", "prompt": "x", "generator": "", "solutions": []}\n')
    (tmp_path / "out.jsonl").write_text("my data\n")
    proc = run_tool("tools/gen_code_tests.py", "--input", str(tmp_path / "problems.jsonl"),
                    "--output", str(tmp_path / "out.jsonl"), timeout=120)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr and str(tmp_path / "out.jsonl") in proc.stderr
    assert (tmp_path / "out.jsonl").read_text() == "my data\n"
