"""Memory per parameter of a peer: the slope of its peak RSS between two model sizes.

    python -m bench.memory [--params 5000000,50000000] [--peers 2] [--rounds 3] [--json]

For each N, ``--peers`` real peers (``bench.averaging --memory``: a ``Daemon`` with the synthetic
N-parameter model on CPU, int8, error feedback on) run rounds, and after every round each builds
the donor snapshot that a joiner would fetch. The worker holds nothing else of size N but its
delta. The figure is the largest peer's peak RSS (VmHWM) after the rounds; its slope between the
smallest and the largest N is the cost per parameter above the process baseline (imports, gRPC,
torch), which the slope cancels.
"""

from __future__ import annotations

import argparse
import sys

from bench.averaging import BenchError, run
from bench.common import emit_json, machine


def measure(sizes: list[int], peers: int, rounds: int, timeout_s: float) -> dict:
    rows = []
    for n in sizes:
        res = run("peer", peers, n, "int8", rounds=rounds, warmup=1, timeout_s=timeout_s, memory=True)
        if res["rounds_failed"]:
            raise BenchError(f"N={n}: {res['rounds_failed']} rounds failed")
        rows.append({"params": n, "median_round_s": res["median_s"],
                     **{k: res[k] for k in ("ready_peak_rss_bytes", "round_peak_rss_bytes",
                                            "snapshot_peak_rss_bytes", "peak_rss_bytes")}})
    lo, hi = rows[0], rows[-1]

    def slope(key: str) -> float:
        return (hi[key] - lo[key]) / (hi["params"] - lo["params"])

    return {"bench": "memory", "machine": machine(), "peers": peers, "rounds": rounds, "rows": rows,
            "bytes_per_param": slope("peak_rss_bytes"), "bytes_per_param_at_start": slope("ready_peak_rss_bytes"),
            "bytes_per_param_in_round": slope("round_peak_rss_bytes"),
            "bytes_per_param_in_snapshot": slope("snapshot_peak_rss_bytes")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="5000000,50000000", help="model sizes, smallest and largest (comma list)")
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    sizes = sorted(int(x) for x in a.params.split(","))
    if len(sizes) < 2:
        print("memory bench needs at least two sizes", file=sys.stderr)
        return 2
    try:
        res = measure(sizes, a.peers, a.rounds, a.timeout)
    except BenchError as exc:
        print(f"memory bench failed: {exc}", file=sys.stderr)
        return 1
    if a.json:
        emit_json(res)
        return 0
    print(f"memory: peer, K={a.peers}, int8, error feedback on, donor snapshot after every round; {res['machine']}")
    print(f"  {'params':>12} {'peak RSS at start MB':>21} {'peak RSS MB':>12} {'round s':>8}")
    for r in res["rows"]:
        print(f"  {r['params']:>12,} {r['ready_peak_rss_bytes'] / 1e6:>21.0f} {r['peak_rss_bytes'] / 1e6:>12.0f} "
              f"{r['median_round_s']:>8.2f}")
    print(f"  bytes per parameter (slope of peak RSS): {res['bytes_per_param']:.1f}  (peak at start, before any "
          f"round: {res['bytes_per_param_at_start']:.1f}; in a round: {res['bytes_per_param_in_round']:.1f}; "
          f"building the donor snapshot: {res['bytes_per_param_in_snapshot']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
