"""Training overhead of the sync: steps/s with a round every H inner steps against the same loop
with no networking.

    python -m bench.overhead [--tasks digits,fashion] [--H 10,50,200] [--peers 2] [--json]
                             [--device cpu|cuda] [--precision fp32|bf16] [--overlap] [--repeats R]

Each of ``--peers`` worker processes (one torch thread each) builds a real ``Daemon`` for the
task and drives its ``InnerTrainer``: first ``plain`` (H-step inner phases back to back, no
round), then ``sync`` (each H-step phase followed by ``Daemon.round_once``: matchmaking,
butterfly all-reduce over gRPC, codec, outer step, state snapshot and checkpoint). All workers
run both variants at the same time, so CPU contention is the same in both; eval is off in both.
With 2 peers the round includes the slower peer's wait (a straggler costs its partner); with
``--peers 1`` the round has no network transfer but every local cost. ``--overlap`` adds a third
variant, ``overlap``: each phase's round runs while the next phase trains (the daemon's
``sync.overlap``). ``--repeats R`` runs the variants in turn R times and reports medians (a
ratio within each repeat): on a 2-core VM one variant's speed moves by a third from minute to
minute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from bench.averaging import REPO, BenchError, Worker, _free_ports
from bench.common import PHASES, emit_json, machine, table, throwaway_credentials


def available_tasks(names: list[str]) -> list[str]:
    out = []
    for name in names:
        if name == "fashion" and not os.path.isdir("/usr/share/datasets/fashion-mnist"):
            continue
        out.append(name)
    return out


def run(tasks: list[str], hs: list[int], peers: int, codec: str, min_steps: int, timeout_s: float,
        device: str = "cpu", precision: str = "fp32", overlap: bool = False, repeats: int = 1) -> dict:
    import time

    rows = []
    deadline = time.monotonic() + timeout_s
    for task in available_tasks(tasks):
        ports = _free_ports(peers)
        addresses = [f"127.0.0.1:{p}" for p in ports]
        # The repository first, then whatever the caller's PYTHONPATH holds (packages carried to a
        # machine whose Python lacks them, as bench/gpu_check.sh is run on a lent GPU).
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        workers: list[Worker] = []
        with tempfile.TemporaryDirectory(prefix="bench-overhead-") as log_dir:
            try:
                run_id = f"bench-ovh-{os.getpid()}-{task}"
                credentials = throwaway_credentials(run_id)
                for rank in range(peers):
                    argv = [sys.executable, "-m", "bench._overhead_worker", "--rank", str(rank), "--peers",
                            str(peers), "--task", task, "--codec", codec, "--addresses", json.dumps(addresses),
                            "--run-id", run_id, "--credentials", credentials, "--device", device,
                            "--precision", precision]
                    workers.append(Worker(rank, argv, log_dir, env))
                numel = [w.expect("ready", min(deadline, time.monotonic() + 120)) for w in workers][0]["numel"]
                for h in hs:
                    total = max(min_steps, 4 * h) // h * h
                    # One untimed phase first: the first steps pay for kernel selection, caches and
                    # (on a GPU) clocks ramping up, which would be charged to whichever variant ran
                    # first (on an H200 that made sync 1.2x faster than plain).
                    for w in workers:
                        w.send(f"plain {h} {h}")
                    for w in workers:
                        w.expect("plain", deadline)
                    variants = ("plain", "sync", "overlap") if overlap else ("plain", "sync")
                    # Each repeat runs every variant once, in turn; a ratio is taken within one
                    # repeat (the same minute's machine), then the median over the repeats.
                    reps: list[dict[str, list[dict]]] = []
                    for _ in range(repeats):
                        res = {}
                        for variant in variants:
                            for w in workers:
                                w.send(f"{variant} {h} {total}")
                            res[variant] = [w.expect(variant, deadline) for w in workers]
                        reps.append(res)

                    def speed(res: dict, variant: str) -> float:
                        return min(r["steps_per_s"] for r in res[variant])  # the slowest peer's

                    def per_round(res: dict, variant: str) -> float:
                        return max(r["round_s_total"] / max(1, r["rounds"]) for r in res[variant])

                    def med(f) -> float:
                        return statistics.median(f(res) for res in reps)

                    def ratios(variant: str) -> list[float]:  # one a repeat, against that repeat's plain
                        return [speed(res, variant) / speed(res, "plain") for res in reps]

                    slowest = max(reps[-1]["sync"], key=lambda r: r["round_s_total"])
                    sync_ratios = ratios("sync")
                    overlap_ratios = ratios("overlap") if overlap else []
                    row = {} if not overlap else {
                        "overlap_steps_per_s": med(lambda res: speed(res, "overlap")),
                        "overlap_ratio": statistics.median(overlap_ratios),
                        "overlap_ratios": overlap_ratios,
                        "overlap_wait_s_mean": med(lambda res: per_round(res, "overlap")),
                        "overlap_rounds_failed": sum(r["rounds_failed"] for res in reps for r in res["overlap"]),
                    }
                    rows.append({
                        **row,
                        "task": task, "params": numel, "H": h, "steps": total, "peers": peers, "repeats": repeats,
                        "plain_steps_per_s": med(lambda res: speed(res, "plain")),
                        "sync_steps_per_s": med(lambda res: speed(res, "sync")),
                        "ratio": statistics.median(sync_ratios),
                        "ratios": sync_ratios,
                        "rounds": reps[-1]["sync"][0]["rounds"],
                        "rounds_failed": sum(r["rounds_failed"] for res in reps for r in res["sync"]),
                        "round_s_mean": med(lambda res: per_round(res, "sync")),
                        # Where the slowest peer's round went in the last repeat (its phase
                        # histograms; the rest of round_once is the snapshot and bookkeeping).
                        "phases_ms": "/".join(f"{1e3 * slowest[f'{ph}_s_total'] / max(1, slowest['rounds']):.1f}"
                                              for ph in PHASES),
                    })
                for w in workers:
                    w.send("stop")
                for w in workers:
                    try:
                        w.expect("done", time.monotonic() + 15)
                    except BenchError:
                        pass
            finally:
                for w in workers:
                    w.kill()
    return {"bench": "overhead", "codec": codec, "peers": peers, "device": device, "precision": precision,
            "machine": machine(), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="digits,fashion")
    p.add_argument("--H", default="10,50,200")
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--codec", default="int8")
    p.add_argument("--min-steps", type=int, default=600, help="inner steps per variant (at least 4 rounds)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--device", default="cpu", help="where every peer trains: cpu, cuda or cuda:N (they share it)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="inner phase under bf16 autocast")
    p.add_argument("--repeats", type=int, default=1, help="run the variants in turn this many times; medians")
    p.add_argument("--overlap", action="store_true",
                   help="also run each round while the next inner phase trains (the daemon's sync.overlap)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, not {a.repeats}")
    try:
        res = run(a.tasks.split(","), [int(x) for x in a.H.split(",")], a.peers, a.codec, a.min_steps, a.timeout,
                  a.device, a.precision, a.overlap, a.repeats)
    except BenchError as exc:
        print(f"overhead bench failed: {exc}", file=sys.stderr)
        return 1
    if a.json:
        emit_json(res)
        return 0
    print(f"overhead: {a.peers} peer(s) on loopback, codec {a.codec}, training on {a.device} ({a.precision}), "
          f"one torch thread each; {res['machine']}")
    print("steps/s = slowest peer's; ratio = sync / plain (target >= 0.95 at H=50)"
          + (f"; medians over {a.repeats} repeats of the variants in turn" if a.repeats > 1 else ""))
    print(table(res["rows"], [("task", "task", ""), ("params", "params", ","), ("H", "H", "d"), ("steps", "steps", "d"),
                              ("plain_steps_per_s", "plain steps/s", ".0f"), ("sync_steps_per_s", "sync steps/s", ".0f"),
                              ("ratio", "ratio", ".3f"), ("round_s_mean", "s/round", ".4f"),
                              ("phases_ms", "mm/reduce/outer ms", ""),
                              ("rounds_failed", "failed", "d")]))
    if a.overlap:
        print("overlap: each round runs while the next inner phase trains (sync.overlap); wait = the part of "
              "a round the next phase did not hide")
        print(table(res["rows"], [("task", "task", ""), ("H", "H", "d"),
                                  ("overlap_steps_per_s", "overlap steps/s", ".0f"), ("overlap_ratio", "ratio", ".3f"),
                                  ("overlap_wait_s_mean", "wait s/round", ".4f"),
                                  ("overlap_rounds_failed", "failed", "d")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
