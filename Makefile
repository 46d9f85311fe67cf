# The two commands of the README. Each creates or reuses .venv (scripts/setup_venv.sh) first.
PY := .venv/bin/python

.PHONY: tiny test setup bench
setup:
	@bash scripts/setup_venv.sh

# The main job on its built-in tiny default: data -> SFT -> eval -> RL -> eval -> paired report
# (runs/tiny-arith/report.md; exit status 1 if RL's gain does not clear 3 standard errors).
tiny: setup
	$(PY) -m k15_megatron.cli tiny

# The test suite (what .ci/run runs).
test: setup
	$(PY) -m pytest -q

# Every benchmark of tools/bench/ (ours vs its baseline, RESULT lines; logs in runs/bench/),
# after installing what the baselines need (TRL). Not part of the tests.
bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) tools/bench/run_all.py
