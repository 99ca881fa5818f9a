"""Rank functions for tests/torch/test_spawn.py, in a module that imports nothing heavy: a spawned rank imports the
module its function lives in, and a test module would pull in transformers first."""

from __future__ import annotations

import os
import time
from pathlib import Path


def dies_or_hangs(rank, world, port, out, how):
    """Rank 0 writes its file and returns; rank 1 waits for that file, then dies (``how="dies"``) or hangs."""
    Path(out, f"rank{rank}.done").write_text("written before the failure")
    if rank == 1:
        for _ in range(600):  # rank 0's result is on disk before rank 1 fails (a loaded machine starts ranks slowly)
            if Path(out, "rank0.done").exists():
                break
            time.sleep(0.1)
        if how == "dies":
            os._exit(3)  # no Python exception: what a segfault or the OOM killer leaves
        time.sleep(600)  # hangs
