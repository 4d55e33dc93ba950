"""The 2-rank FSDP2 script: runs every case in one pair of processes and saves the results.

Run as ``python -m tests.shard.run_cases OUT [CASE ...]``; Lightning's launcher starts rank 1
by re-running the same command. Each case's adapter is written with ``save_adapter`` from the
sharded model (every rank calls it, rank 0 writes), so the comparison with one process also
checks the gathered save. Per-rank facts (masks, selections) go to ``rank<r>.pt``.
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)


@atexit.register
def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    from tests.shard import common, extra_cases

    out = Path(sys.argv[1])
    names = sys.argv[2:] or [*common.CASES, *extra_cases.EXTRA]
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    per_rank: dict[str, object] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            if name in common.CASES:
                per_rank[name] = common.run(name, out, rank)
            else:
                per_rank[name] = extra_cases.EXTRA[name](out, rank)
        except Exception:
            errors[name] = traceback.format_exc()
        # after every case: a later crash (Lightning kills all ranks) keeps what ran
        torch.save({"results": per_rank, "errors": errors}, out / f"rank{rank}.pt")
    torch.save({"results": per_rank, "errors": errors}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
