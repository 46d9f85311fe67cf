"""FP8 training: what each ``precision.fp8_recipe`` needs from the machine, checked before any
process group starts.

FP8 in k15-megatron is Megatron-Core's own FP8 path: ``precision.*`` becomes the
TransformerConfig's ``fp8*`` fields (:func:`k15_megatron.models.gpt.fp8_config_fields`), the
Transformer Engine layer spec is used (:mod:`k15_megatron.models.specs`), and Megatron-Core's
TransformerBlock enters TE's ``fp8_autocast`` (and ``fp8_model_init`` with FP8 parameters)
itself. Without TE Megatron-Core accepts ``fp8`` and silently trains in the base dtype, so the
refusal has to happen here.

Requirements, from Transformer Engine's recipes and Megatron-Core's ``fp8_utils.get_fp8_recipe``:

==========  ======================  =============================  =========================
recipe      TE recipe class         GPU (compute capability)       Transformer Engine
==========  ======================  =============================  =========================
delayed     DelayedScaling          >= 8.9 (Ada, Hopper, newer)    any with FP8
tensorwise  Float8CurrentScaling    >= 8.9                         >= 2.2
blockwise   Float8BlockScaling      >= 9.0 (Hopper, newer)         >= 2.3
mxfp8       MXFP8BlockScaling       >= 10.0 (Blackwell)            >= 2.1
==========  ======================  =============================  =========================

``precision.fp8_param_gather`` keeps the GEMM weights in FP8 and all-gathers them as FP8; only
the distributed optimizer re-quantises its fp32 master shards into those weights, so Megatron-LM
refuses it without the distributed optimizer (``--fp8-param-gather``), and so does this module.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
from typing import List, Optional, Tuple

RECIPE_NEEDS = {
    # recipe: (minimum compute capability, minimum Transformer Engine version or None)
    "delayed": ((8, 9), None),
    "tensorwise": ((8, 9), (2, 2)),
    "blockwise": ((9, 0), (2, 3)),
    "mxfp8": ((10, 0), (2, 1)),
}
"""What each ``precision.fp8_recipe`` needs (see the module docstring's table)."""


@dataclasses.dataclass(frozen=True)
class Fp8Platform:
    """What this machine offers FP8 training."""

    te_version: Optional[str]
    """Installed Transformer Engine version (``None``: not installed)."""
    compute_capability: Optional[Tuple[int, int]]
    """(major, minor) of this process's CUDA device (``None``: no CUDA device)."""


def _release(version: Optional[str]) -> Tuple[int, ...]:
    """(major, minor, ...) of a version string; () when absent or unparsable."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release if version else ()
    except InvalidVersion:
        return ()


def probe_fp8_platform() -> Optional[Fp8Platform]:
    """This machine's platform, or ``None`` when Transformer Engine is not installed (then the
    "needs Transformer Engine" rule decides and nothing else can be probed meaningfully).
    Imports torch only when TE is installed."""
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    try:
        te_version = importlib.metadata.version("transformer_engine")
    except importlib.metadata.PackageNotFoundError:
        te_version = "unknown"
    import torch

    capability = None
    if torch.cuda.is_available():
        # This rank's own GPU: probing device 0 from every rank would put a CUDA context on it.
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        capability = torch.cuda.get_device_capability(local % torch.cuda.device_count())
    return Fp8Platform(te_version=te_version, compute_capability=capability)


def fp8_platform_errors(prec, platform: Fp8Platform) -> List[str]:
    """Problems running ``prec`` (a PrecisionConfig with ``fp8`` set) on ``platform``; each
    names ``precision.fp8`` / ``precision.fp8_recipe`` and the fix."""
    recipe = prec.fp8_recipe
    (need_cc, need_te) = RECIPE_NEEDS[recipe]
    head = f"precision.fp8={prec.fp8!r} with precision.fp8_recipe={recipe!r}"
    errors = []
    if platform.compute_capability is None:
        errors.append(f"{head} needs a CUDA GPU of compute capability >= {need_cc[0]}.{need_cc[1]}, "
                      "and this process sees none; set precision.fp8=null")
    elif tuple(platform.compute_capability) < need_cc:
        have = ".".join(map(str, platform.compute_capability))
        errors.append(f"{head} needs a GPU of compute capability >= {need_cc[0]}.{need_cc[1]}; this "
                      f"one has {have}; set precision.fp8=null"
                      + (" or precision.fp8_recipe=delayed" if tuple(platform.compute_capability) >= (8, 9) else ""))
    have_te = _release(platform.te_version)
    if need_te is not None and have_te and have_te < need_te:
        errors.append(f"{head} needs Transformer Engine >= {need_te[0]}.{need_te[1]}; installed: "
                      f"{platform.te_version}; use precision.fp8_recipe=delayed or a newer TE")
    return errors


def fp8_errors(prec, *, te_installed: bool, platform: Optional[Fp8Platform],
               use_distributed_optimizer: bool) -> List[str]:
    """Every FP8 rule that needs more than the precision section (see the module docstring).

    ``platform`` ``None`` (TE not installed in this process) skips the hardware rules: the
    Transformer Engine rule already refuses, or ``te_installed`` was given by a caller that
    probes elsewhere.
    """
    if prec.fp8 is None:
        return []
    if not te_installed:
        return [f"precision.fp8={prec.fp8!r} needs Transformer Engine, which is not installed "
                "here (without it Megatron-Core would silently train in precision.dtype); set "
                "precision.fp8=null or install the gpu extra (transformer-engine[pytorch])"]
    errors = fp8_platform_errors(prec, platform) if platform is not None else []
    if prec.fp8_param_gather and not use_distributed_optimizer:
        errors.append("precision.fp8_param_gather=true needs optim.use_distributed_optimizer=true "
                      "(only the distributed optimizer re-quantises its master weights into FP8 "
                      "parameters); set one or the other")
    return errors
