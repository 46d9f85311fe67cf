"""torchvision's CUDA-only build imports on this CPU machine through the start-up hook
(k15_megatron/parallel/cpu/torchvision_hook.py): a fresh interpreter runs the ``.pth`` line the set-up
script installs, then imports torchvision and the image transforms transformers' processors use."""

from __future__ import annotations

import subprocess
import sys

from k15_megatron.parallel.cpu.torchvision_hook import PTH_LINE


def test_torchvision_imports_on_cpu_after_the_start_up_hook():
    code = PTH_LINE + (
        "import sys, torch, torchvision\n"
        "from torchvision.transforms import v2\n"
        "assert not torch.cuda.is_available()\n"
        "stub = sys.modules['torchvision._meta_registrations']\n"
        "assert stub.__doc__.startswith('empty on CPU'), stub\n"
        "image = torch.rand(3, 28, 42)\n"
        "print(tuple(v2.functional.resize(image, [14, 21], antialias=True).shape))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("(3, 14, 21)")
