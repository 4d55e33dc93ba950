"""Run a script under Lightning's DDP with 2 CPU processes (gloo) and collect per-rank results.

Lightning's ``strategy="ddp"`` relaunches the running script for the other ranks, so the test body
lives in a script file run in a subprocess. The script must save what the test compares with
``save_rank_result(out_dir, obj)``.

Each rank destroys its process group at exit. Left to interpreter shutdown, gloo's worker threads
can outlive the interpreter and the process aborts ("terminate called without an active
exception") after the test body has already finished.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

PRELUDE = """
import atexit, os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
OUT = sys.argv[1]

@atexit.register
def _destroy_process_group():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

def save_rank_result(obj):
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.save(obj, os.path.join(OUT, f"rank{rank}.pt"))

def ddp_trainer(**kwargs):
    import lightning as L
    defaults = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    defaults.update(kwargs)
    return L.Trainer(**defaults)
"""


def run_ddp(tmp_path: Path, body: str, timeout: float = 240) -> list[object]:
    """Run ``body`` (Python source using ``ddp_trainer`` and ``save_rank_result``) on 2 ranks."""
    script = tmp_path / "ddp_script.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    out = tmp_path / "ddp_out"
    out.mkdir(exist_ok=True)
    env = dict(
        os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"DDP script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return results
