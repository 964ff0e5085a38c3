"""Training throughput of real `peer run` swarms with rounds after every inner phase, with and
without overlapping the round with the next inner phase, against the same InnerTrainer loop with
no networking, in one run.

    python -m bench.overlap [--task fashion] [--peers 2] [--H 50] [--rounds 20] [--json]

Each variant starts ``--peers`` processes at once on 127.0.0.1 (one torch thread each):
  plain     InnerTrainer.run_inner for rounds*H steps, no daemon, no network;
  sequential  `peer run --rounds R --inner-steps H` (the default: round, then next phase);
  overlap   the same with `--overlap on` (the round runs while the next phase trains).
steps/s = rounds*H / the slowest peer's time from its first inner step to its last completed
round (read from its log timestamps); eval off, checkpoints at the default.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from bench.common import emit_json, machine, throwaway_credentials

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.M)

PLAIN = """
import sys, time, torch
torch.set_num_threads(1)
from peer.trainer import InnerTrainer, load_task
task = load_task(sys.argv[1])
t = InnerTrainer(task, seed=0, stream_id=sys.argv[2], threads=1, batch_size=task.defaults.batch_size,
                 inner_lr=task.defaults.inner_lr)
params = t.initial_params()
steps, rounds = int(sys.argv[3]), int(sys.argv[4])
t.run_inner(params, 5)  # warm-up
t0 = time.perf_counter()
for _ in range(rounds):
    params = params - t.run_inner(params, steps).delta
print(rounds * steps / (time.perf_counter() - t0))
"""


def _stamp(line: str) -> float:
    return datetime.strptime(STAMP.match(line)[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _plain(task: str, peers: int, h: int, rounds: int) -> float:
    procs = [subprocess.Popen([sys.executable, "-c", PLAIN, task, f"p{i}", str(h), str(rounds)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for i in range(peers)]
    try:
        return min(float(p.communicate(timeout=600)[0].strip()) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _swarm(task: str, peers: int, h: int, rounds: int, overlap: bool) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="bench-overlap-"))
    run_id = f"ovl-{os.getpid()}-{int(overlap)}"
    credentials = throwaway_credentials(run_id)
    procs, logs = [], []
    try:
        for i in range(peers):
            log = tmp / f"p{i}.log"
            argv = [sys.executable, "-m", "peer", "run", "--run-id", run_id, "--credentials", credentials,
                    "--task", task, "--listen", "127.0.0.1:0",
                    "--metrics-port", "0", "--interface", "127.0.0.1", "--state-dir", str(tmp / f"p{i}"),
                    "--inner-steps", str(h), "--rounds", str(rounds), "--eval-every-rounds", "0",
                    "--startup-grace-s", "4", "--overlap", "on" if overlap else "off"]
            with open(log, "wb") as fh:
                procs.append(subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                              env={**os.environ, "PYTHONUNBUFFERED": "1"}))
            logs.append(log)
        for p in procs:
            if p.wait(900) != 0:
                raise RuntimeError(f"a peer exited with {p.returncode}; logs in {tmp}")
        rates = []
        for log in logs:
            lines = log.read_text().splitlines()
            t0 = _stamp(next(x for x in lines if "initial eval loss" in x))
            t1 = _stamp([x for x in lines if " done: " in x][-1])
            done = len([x for x in lines if " done: " in x])
            rates.append(done * h / (t1 - t0))
        return min(rates)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--H", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    plain = _plain(args.task, args.peers, args.H, args.rounds)
    sequential = _swarm(args.task, args.peers, args.H, args.rounds, overlap=False)
    overlap = _swarm(args.task, args.peers, args.H, args.rounds, overlap=True)
    result = {"bench": "overlap", "task": args.task, "peers": args.peers, "H": args.H, "rounds": args.rounds,
              "machine": machine(), "plain_steps_s": plain, "sequential_steps_s": sequential,
              "overlap_steps_s": overlap, "sequential_ratio": sequential / plain, "overlap_ratio": overlap / plain}
    if args.json:
        emit_json(result)
    else:
        print(f"overlap: {args.peers} peers, task {args.task}, H={args.H}, {args.rounds} rounds; {machine()}")
        print(f"  plain       {plain:8.1f} steps/s")
        print(f"  sequential  {sequential:8.1f} steps/s  ({result['sequential_ratio']:.2f}x plain)")
        print(f"  overlap     {overlap:8.1f} steps/s  ({result['overlap_ratio']:.2f}x plain)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
