"""The quiet default hides library warnings but never k15's own; --verbose (K15_VERBOSE) undoes
the quiet settings a parent command made, so `k15 tiny --verbose` stages print everything."""

import subprocess
import sys

from tooling import REPO_ROOT

PROBE = """
import os, warnings
from k15_megatron.jobs import verbosity
verbosity.configure(verbose={verbose})
exec('import warnings; warnings.warn("k15 says")', {{'__name__': 'k15_megatron.checkpoint.run_ckpt'}})
exec('import warnings; warnings.warn("library says")', {{'__name__': 'megatron.core.optimizer'}})
print("VLLM_LOGGING_LEVEL=" + os.environ.get("VLLM_LOGGING_LEVEL", "<unset>"))
"""


def _probe(verbose, env_extra=None):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "VLLM_LOGGING_LEVEL", "K15_VERBOSE")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", PROBE.format(verbose=verbose)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_quiet_hides_library_warnings_only_and_verbose_undoes_a_parents_quiet_settings():
    quiet = _probe(False)
    assert "k15 says" in quiet.stderr and "library says" not in quiet.stderr
    assert "VLLM_LOGGING_LEVEL=ERROR" in quiet.stdout
    # a stage started by a quiet parent inherits its environment; --verbose there, or K15_VERBOSE=1
    # from a verbose parent, restores the libraries' defaults
    for verbose, extra in ((True, {}), (False, {"K15_VERBOSE": "1"})):
        loud = _probe(verbose, {"PYTHONWARNINGS": "ignore", "VLLM_LOGGING_LEVEL": "ERROR", **extra})
        assert "k15 says" in loud.stderr and "library says" in loud.stderr, loud.stderr
        assert "VLLM_LOGGING_LEVEL=<unset>" in loud.stdout
