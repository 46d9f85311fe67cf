"""`k15 config show`: the resolved YAML on success (exit 0), every problem on stderr and exit 2
without a traceback on an invalid config; run as a real subprocess and in-process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from k15_megatron import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny.yaml")


def run_k15(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "SLURM_NTASKS")}
    return subprocess.run([sys.executable, "-m", "k15_megatron.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_show_prints_resolved_yaml_subprocess():
    proc = run_k15("config", "show", TINY, "parallel.tensor=2", "parallel.world_size=2",
                   "name=cli-run")
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["parallel"]["tensor"] == 2 and shown["parallel"]["world_size"] == 2
    assert shown["run_dir"] == "runs/cli-run"  # interpolation resolved
    assert shown["checkpoint"]["save_dir"] == "runs/cli-run/checkpoints"
    assert shown["model"]["num_layers"] == 2 and shown["precision"]["dtype"] == "fp32"


def test_show_invalid_config_exits_2_without_traceback_subprocess():
    proc = run_k15("config", "show", TINY, "parallel.tensor=3", "parallel.world_size=3",
                   "model.num_layer=3")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert "'model.num_layer'" in proc.stderr and "did you mean 'model.num_layers'" in proc.stderr
    proc = run_k15("config", "show", TINY, "parallel.tensor=3", "parallel.world_size=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.num_attention_heads=4 is not divisible by parallel.tensor=3" in proc.stderr


def test_show_in_process(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert cli.main(["config", "show", TINY, "data.seq_length=128"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["data"]["seq_length"] == 128 and err == ""
    assert cli.main(["config", "show", os.path.join(REPO, "examples", "missing.yaml")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "config file not found" in err and "missing.yaml" in err


def test_usage_errors_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0 and "config" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["config", "show", "--help"])
    assert info.value.code == 0 and "KEY=VALUE" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["config", "show"])  # CONFIG missing
    assert info.value.code == 2


def test_every_command_target_resolves():
    # The registry's "module:function" strings are only imported when used: check them all.
    for command in cli.COMMANDS:
        assert callable(cli._resolve(command.target)), command
