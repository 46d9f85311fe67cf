"""How much a ``k15`` command prints: its own lines always, library chatter only with ``--verbose``.

Without ``--verbose`` a job prints k15's progress lines, results and errors; what the libraries
print at import or start-up is held back:

* vLLM's engine config dumps and INFO/WARNING lines (``VLLM_LOGGING_LEVEL=ERROR``);
* Python warnings of the libraries (Megatron's "Apex is not installed", deprecations):
  filtered here and, for the processes started later, through ``PYTHONWARNINGS`` (warnings
  raised by k15's own modules still print);
* the loggers of Megatron-Core, torch and transformers (``TRANSFORMERS_VERBOSITY=error``) and
  torch's C++ warnings such as c10d's (``TORCH_CPP_LOG_LEVEL=ERROR``);
* progress bars of transformers and vLLM's weight loading (``HF_HUB_DISABLE_PROGRESS_BARS``,
  ``TQDM_DISABLE``).

Errors (level ERROR and above, exceptions, tracebacks) always print. The settings are made in
one place, :func:`configure`, which ``k15_megatron.cli`` calls before a command's module (and
with it torch, Megatron, vLLM) is imported. Environment variables carry them into the ranks k15
starts (each rank runs the same command line and so ``configure`` again) and into vLLM's engine
processes. A variable the user has set is left alone.
"""

from __future__ import annotations

import logging
import os
import warnings

QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "PYTHONWARNINGS": "ignore",
    "TRANSFORMERS_VERBOSITY": "error",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}
"""Environment of a quiet command (values applied with ``setdefault``)."""

QUIET_LOGGERS = ("megatron", "transformers", "torch", "vllm", "py.warnings")
"""Library loggers set to ERROR in this process when quiet."""

VERBOSE_FLAG = "K15_VERBOSE"
"""Set to "1" by ``--verbose`` so that child commands (``k15 tiny``'s stages) stay verbose."""


def configure(*, verbose: bool) -> None:
    """Apply the quiet (default) or verbose settings to this process and its children.

    ``verbose``: the command's ``--verbose`` flag (also true when ``K15_VERBOSE=1`` is set, as
    for the stages of a verbose ``k15 tiny``). Verbose removes the quiet values a parent
    command set, so the libraries print at their own defaults.
    """
    verbose = verbose or os.environ.get(VERBOSE_FLAG) == "1"
    if verbose:
        os.environ[VERBOSE_FLAG] = "1"
        for key, value in QUIET_ENV.items():
            if os.environ.get(key) == value:
                del os.environ[key]
                if key == "PYTHONWARNINGS":  # it also set this interpreter's filters at start-up
                    warnings.simplefilter("default")
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if os.environ["PYTHONWARNINGS"] == QUIET_ENV["PYTHONWARNINGS"]:
        warnings.simplefilter("ignore")
        # k15's own warnings are messages to the user, not library chatter (filters added
        # later take precedence).
        warnings.filterwarnings("default", module=r"k15_megatron(\.|$)")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def add_flag(parser) -> None:
    """The ``--verbose`` option of a command's argparse parser (applied by :func:`configure`)."""
    parser.add_argument("--verbose", action="store_true",
                        help="also print library warnings and engine config dumps (vLLM, Megatron, "
                             "transformers, torch), hidden by default")
