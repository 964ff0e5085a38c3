"""The outer step alone, one torch thread: the reference, the hashed step into fresh tensors and
the hashed step in place (what a peer runs when nothing pins its state).

    python -m bench.outer_step [--numel 10000000] [--reps 7]

Prints the minimum and median of ``--reps`` runs of each, after checking that the three give the
same bits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.common import machine
from peer.sync.outer import finite_bound, outer_step, outer_step_hashed, step_hashed_into, tensor_digest


def _time(fn, reps: int) -> tuple[float, float]:
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return min(runs), statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=10_000_000)
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    theta, buf = torch.randn(a.numel, generator=gen), torch.randn(a.numel, generator=gen)
    grad = torch.randn(a.numel, generator=gen) * 1e-3
    kw = {"lr": 0.7, "momentum": 0.9}
    want_p, want_b = outer_step(theta, grad, buf, **kw)
    p_in, b_in = theta.clone(), buf.clone()
    digest, _ = step_hashed_into(p_in, grad, b_in, p_in, b_in, **kw)
    fresh_p, fresh_b, fresh_digest, _ = outer_step_hashed(theta, grad, buf, **kw)
    same = all(torch.equal(x.view(torch.int32), y.view(torch.int32))
               for x, y in ((want_p, p_in), (want_b, b_in), (want_p, fresh_p), (want_b, fresh_b)))
    if not (same and digest == fresh_digest == tensor_digest(want_p)):
        print("the steps differ", file=sys.stderr)
        return 1
    del want_p, want_b, fresh_p, fresh_b
    rows = [
        ("outer_step (reference: clones, no hash)", lambda: outer_step(theta, grad, buf, **kw)),
        ("outer_step_hashed (fresh tensors)", lambda: outer_step_hashed(theta, grad, buf, **kw)),
        ("step_hashed_into, in place", lambda: step_hashed_into(p_in, grad, b_in, p_in, b_in, **kw)),
        ("finite_bound (one aminmax of the average)", lambda: finite_bound(1.0, grad, **kw)),
    ]
    print(f"outer step of {a.numel:,} values, 1 torch thread, {a.reps} runs; {machine()}")
    for name, fn in rows:
        lo, mid = _time(fn, a.reps)
        print(f"  {name:<48} min {lo * 1e3:7.1f} ms  median {mid * 1e3:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
