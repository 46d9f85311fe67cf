# The two commands of the README. Each creates or reuses .venv (scripts/setup_venv.sh) first.
PY := .venv/bin/python

.PHONY: tiny test setup
setup:
	@bash scripts/setup_venv.sh

# The main job on its built-in tiny default.
tiny: setup
	$(PY) -m k15_megatron.cli demo examples/tiny.yaml parallel.tensor=2 parallel.world_size=2 \
		optim.train_iters=150 optim.lr=3e-3

# The test suite (what .ci/run runs).
test: setup
	$(PY) -m pytest -q
