"""``methods/`` and ``schedules/`` are pure torch: importing them loads no Lightning."""

from __future__ import annotations

import subprocess
import sys


def test_methods_and_schedules_import_no_lightning():
    code = (
        "import sys\n"
        "import lightning_lowrank.methods, lightning_lowrank.schedules\n"
        "import lightning_lowrank.schedules.lora_drop\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert 'lightning_lowrank.schedules.lora_drop' in sys.modules\n"
        "print(loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout
