"""Run a function on N gloo ranks on the CPU, as separate processes, with a timeout.

Every multi-process test goes through `run_ranks`: it fails with the rank's traceback when any rank
raises, and kills all ranks when one of them hangs past the timeout. Ranks are forked from a forkserver that
has imported torch and rannc once (a fresh process per rank, with nothing of the test process's state); what a
module reads from the environment at import time is the test process's environment when the server started,
not `env` (no test depends on that today)."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A rank whose function has returned keeps its process until every rank has returned (or this long): rank 0's
# process hosts the rendezvous store, which under torchrun lives in the launcher, and a rank that fails later
# must still be able to read the failure report another rank left there.
LINGER_S = 30.0


def _child(fn: Callable, rank: int, world: int, port: int, env: dict, results, args: tuple, all_done) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
                       "RANNC_PROFILE_CACHE_DIR": "", "RANNC_VERBOSE": "0", "RANNC_COMM_TIMEOUT_S": "60",
                       # one timed run per block: the tests check numbers, not plan quality (keeps the suite short)
                       "RANNC_PROFILE_REPEATS": "1"})
    os.environ.update(env)
    try:
        import torch
        torch.set_num_threads(1)
        # plain pickle: tensors travel by value, not as shared memory that dies with the child
        results.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException as exc:  # report everything, SystemExit included
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    all_done.wait(LINGER_S)


# Ranks are forked from one server process that has imported these once: a spawned rank spends ~3.5 s of a
# 2-core machine importing torch, which was most of a small multi-rank test. torch.export's machinery (dynamo,
# the fake-tensor tracer, sympy), which a rank otherwise imports at its first call, saves another 2-3 s per launch
# (a launch of 2 ranks wrapping a small model: ~4.5 s -> ~2 s). Names that do not import are skipped.
PRELOADED = ["torch", "torch.distributed", "rannc", "bert.pretrain", "torch._dynamo", "torch.export",
             "torch.fx.experimental.proxy_tensor", "torch._functorch.aot_autograd", "sympy"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOADED)
    return ctx


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 240.0,
              env: dict | None = None, allow_exit: set[int] | None = None) -> list[Any]:
    """fn(rank, world, *args) on `world` processes; returns the per-rank results in rank order (None for the
    ranks in `allow_exit` that ended their process without a result)."""
    ctx = _context()
    results, all_done = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, env or {}, results, args, all_done),
                         daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < world:
            try:
                rank, status, value = results.get(timeout=1.0)
                (out if status == "ok" else errors)[rank] = value
                continue
            except queue.Empty:
                pass
            missing = [r for r in range(world) if r not in out and r not in errors]
            dead = [r for r in missing if not procs[r].is_alive()]
            if dead:
                time.sleep(0.5)
                if results.empty():
                    out.update({r: pickle.dumps(None) for r in dead if r in (allow_exit or ())})
                    errors.update({r: f"process died with exit code {procs[r].exitcode}" for r in dead
                                   if r not in (allow_exit or ())})
            if time.monotonic() > deadline:
                raise AssertionError(f"ranks {missing} did not finish within {timeout:.0f} s; "
                                     f"errors so far: {errors}")
    finally:
        all_done.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RankError(errors)
    return [pickle.loads(out[r]) for r in range(world)]


class RankError(AssertionError):
    """One or more ranks raised; `errors` maps rank -> traceback text."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        first = min(errors)
        super().__init__(f"rank(s) {sorted(errors)} failed; rank {first}:\n{errors[first]}")
