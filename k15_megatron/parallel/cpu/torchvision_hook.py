"""torchvision on a CPU-only machine: the one workaround vLLM's and transformers' vision code needs.

The package registry has only a CUDA build of torchvision for torch 2.13 (0.28.0+cu130). On the
CPU build of torch its C extension does not load, and ``torchvision/__init__`` then fails in
``torchvision._meta_registrations`` ("operator torchvision::nms does not exist"), which breaks
every import that touches torchvision: vLLM's vision-language models, transformers' image
processors and, through transformers' lazy imports, even its text models.

:func:`install` puts an import hook on ``sys.meta_path``: when ``torchvision`` is first imported
in a process without CUDA, an empty ``torchvision._meta_registrations`` module is registered
before torchvision's ``__init__`` runs. torchvision then imports; its C operators (nms,
roi_align, deformable convolutions, video decoding) stay unavailable, while everything the
models here use (PIL-based image transforms, ``torchvision.transforms.v2`` functionals on
tensors) works. With CUDA the hook does nothing, so a GPU machine imports stock torchvision.

``scripts/setup_venv.sh`` (the CPU stack) installs torchvision without dependencies and a
``k15_torchvision_cpu.pth`` file that calls :func:`install` at interpreter start-up, so every
process of the environment gets the hook before any library can import torchvision. The hook
imports nothing heavy itself: torch is imported only when torchvision is (torchvision imports
torch first anyway).
"""

from __future__ import annotations

import importlib.abc
import sys
import types

_STUB = "torchvision._meta_registrations"


class _TorchvisionMetaStub(importlib.abc.MetaPathFinder):
    """Registers the empty ``torchvision._meta_registrations`` on the first import of
    ``torchvision`` when CUDA is absent; never finds a module itself (returns None)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        if not torch.cuda.is_available() and _STUB not in sys.modules:
            sys.modules[_STUB] = types.ModuleType(_STUB, "empty on CPU: the CUDA build's "
                                                  "meta kernels need its C operators")
        return None


def install() -> None:
    """Add the hook to ``sys.meta_path`` (idempotent; no effect if torchvision is imported already)."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(finder, _TorchvisionMetaStub) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionMetaStub())


PTH_LINE = ("import sys; exec('try:\\n import k15_megatron.parallel.cpu.torchvision_hook as m\\n'"
            " 'except ImportError:\\n m = None\\nif m:\\n m.install()')\n")
"""The line of ``k15_torchvision_cpu.pth`` (a ``.pth`` line starting with ``import`` is run by
``site`` at start-up; the try keeps the environment usable if the package is uninstalled)."""
