"""Shared by the peer scripts: CUDA-event timing (median and min over `iters` runs, after `warmup`), and
the time budget of the GPU-suite call (run.sh exports FUSEKIT_DEADLINE, epoch seconds, and FUSEKIT_QUICK)."""
import os
import sys
import time

import torch

DEADLINE = float(os.environ.get("FUSEKIT_DEADLINE", "inf"))
QUICK = os.environ.get("FUSEKIT_QUICK") == "1"


def out_of_time(what, need=30.0):
    """True (and says so on stderr) when less than `need` seconds of the call's budget are left: the
    caller skips `what`, so the script ends before run.sh's timeout and its records so far count."""
    left = DEADLINE - time.time()
    if left < need:
        print(f"peer: skipped {what}: {left:.0f} s of the time budget left", file=sys.stderr, flush=True)
        return True
    return False


def timed(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2], ts[0], ts[-1]
