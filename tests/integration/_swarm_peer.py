"""A user's own training loop with ``peer.Swarm``, as a process for the integration tests.

Run from the repository root: ``python -m tests.integration._swarm_peer --run-id R --credentials
DIR --state-dir DIR --rounds N [--no-close]``. It builds the ``digits`` model exactly as ``peer
run --task digits`` does (same seed, so the same schema and round-0 parameters), trains it with its
own AdamW loop and calls ``swarm.step()`` after every optimizer step, with the settings the test
peers use (``FAST`` in ``_peers.py``). It logs like ``peer run`` (so the same log parsers apply)
and prints, after every round, ``model holds global <sha256 of the model's parameters> at round
N``. It stops once it has completed ``--rounds`` rounds in a group (rounds it skipped by a resync
do not count): by leaving the ``with`` block, or with ``--no-close`` by simply returning (the
interpreter's exit must close the swarm).
Exit status: 0 when done, 2 when the model did not hold the global parameters after a round, 3
when the rounds did not come within the time limit.
"""

from __future__ import annotations

import argparse
import enum
import gc
import logging
import sys
import threading
import time

import torch

torch.set_num_threads(1)

import peer  # noqa: E402
from peer.sync.outer import tensor_digest  # noqa: E402
from peer.trainer import flatten_state, init_model, load_task  # noqa: E402


def train(swarm: peer.Swarm, model: torch.nn.Module, task, rounds: int, time_limit_s: float) -> int:
    opt = torch.optim.AdamW(model.parameters(), lr=task.defaults.inner_lr)
    batches = task.batches(0, swarm.peer_id, task.defaults.batch_size)
    joined = swarm.round
    print(f"joined at round {joined}, model {tensor_digest(flatten_state(model))[:12]}, "
          f"global {swarm.global_hash[:12]}", flush=True)
    deadline = time.monotonic() + time_limit_s
    while swarm.completed_rounds < rounds:
        if time.monotonic() > deadline:
            print(f"only {swarm.completed_rounds} rounds completed after {time_limit_s} s", flush=True)
            return 3
        x, y = next(batches)
        loss = task.loss(model, (x, y))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if swarm.step(samples=int(x.shape[0]), loss=loss):
            held = tensor_digest(flatten_state(model))
            print(f"model holds global {held[:12]} at round {swarm.round}", flush=True)
            if held != swarm.global_hash:
                print(f"but the global state is {swarm.global_hash[:12]}", flush=True)
                return 2
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--credentials", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--time-limit-s", type=float, default=150.0)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--startup-grace-s", type=float, default=4.0)
    ap.add_argument("--no-close", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    task = load_task("digits")
    model = init_model(task, 0)
    settings = dict(run_id=args.run_id, credentials=args.credentials, inner_steps=args.inner_steps, task=task,
                    state_dir=args.state_dir, listen="127.0.0.1:0", metrics_port=0, interfaces="127.0.0.1",
                    matchmaking_timeout_s=3.0, startup_grace_s=args.startup_grace_s, join_timeout_s=120.0)
    if args.no_close:
        # No with, no close(): leaving main must still leave the run cleanly.
        return train(peer.Swarm(model, **settings), model, task, args.rounds, args.time_limit_s)
    with peer.Swarm(model, **settings) as swarm:
        status = train(swarm, model, task, args.rounds, args.time_limit_s)
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    print(f"threads left after close: {left}", flush=True)
    if left:
        # What keeps gRPC's poller thread alive: its channels and servers still reachable.
        gc.collect()
        for obj in gc.get_objects():
            module = getattr(type(obj), "__module__", "")
            if (isinstance(module, str) and module.startswith("grpc") and not isinstance(obj, (type, enum.Enum))
                    and not callable(obj)):
                holders = [f"{type(ref).__module__}.{type(ref).__name__}" for ref in gc.get_referrers(obj)][:6]
                print(f"still alive: {module}.{type(obj).__name__}, held by {holders}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
