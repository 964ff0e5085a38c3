"""Robust aggregation: one member of five lies; what each rule makes of it.

    python -m bench.robust [--task fashion] [--rounds 25] [--H 30] [--attacks scale,noise] [--json]

A ONE-PROCESS SIMULATION (as ``bench.convergence``), to stay affordable on 2 cores: K=5
``InnerTrainer``s (the product's inner loop, one data stream each) run H steps from the shared
parameters; member 4 is the attacker and replaces its delta by ``-10 x`` its honest delta
(``scale``) or by Gaussian noise of the same norm (``noise``). Each shard goes through what a
real owner does (``peer.sync.round.OwnedShard``): int8 encode/decode of every part, weights
capped (``cap_weights``), parts far above the median norm left out (``norm_outliers``), then
the rule (``peer.sync.aggregate.aggregate``), one re-encode, and the outer step
(``peer.sync.outer.outer_step``). Reference: the four honest members alone with ``mean``.

Also the owner's cost of each rule per round at N=10M: ``aggregate`` over the five parts of one
shard (N/5 values each), median of 5, one torch thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.common import emit_json, machine, pin_threads, table

RULES = ("mean", "trimmed_mean", "centered_clip")


def simulate(task, k: int, h: int, rounds: int, rule: str, attack: str | None, seed: int = 0) -> dict:
    import torch

    from peer.codec import get_codec
    from peer.sync.aggregate import aggregate, cap_weights, norm_outliers
    from peer.sync.outer import outer_step
    from peer.sync.round import shard_bounds
    from peer.trainer import InnerTrainer

    codec = get_codec("int8")
    d = task.defaults
    trainers = [InnerTrainer(task, seed=seed, stream_id=f"w{i}", device="cpu", threads=1,
                             batch_size=d.batch_size, inner_lr=d.inner_lr) for i in range(k)]
    params = trainers[0].initial_params()
    buf = torch.zeros_like(params)
    bounds = shard_bounds(params.numel(), k)
    gen = torch.Generator().manual_seed(seed + 1)
    left_out = 0
    for _ in range(rounds):
        results = [t.run_inner(params, h) for t in trainers]
        deltas = [r.delta for r in results]
        if attack == "scale":
            deltas[-1] = -10.0 * deltas[-1]
        elif attack == "noise":
            noise = torch.randn(deltas[-1].numel(), generator=gen)
            deltas[-1] = noise * (deltas[-1].norm() / noise.norm())
        weights = cap_weights([float(r.samples) for r in results], 4.0)
        shards = []
        for s, e in bounds:
            parts = [codec.decode(codec.encode(x[s:e].contiguous()), e - s) for x in deltas]
            out = set(norm_outliers(parts, 10.0))
            left_out += len(out)
            kept = [i for i in range(k) if i not in out]
            avg = aggregate(rule, [parts[i] for i in kept], [weights[i] for i in kept], 0.2)
            shards.append(codec.decode(codec.encode(avg), e - s))
        params, buf = outer_step(params, torch.cat(shards), buf, lr=d.outer_lr, momentum=d.outer_momentum)
    ev = trainers[0].evaluate(params)
    return {"rule": rule, "attack": attack or "none (4 honest)", "peers": k, "eval_loss": ev["loss"],
            "accuracy": ev.get("accuracy"), "parts_left_out": left_out}


def rule_cost(numel: int, k: int, reps: int = 5) -> list[dict]:
    import torch

    from peer.sync.aggregate import aggregate

    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(numel // k, generator=gen) for _ in range(k)]
    rows = []
    for rule in RULES:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            aggregate(rule, parts, [1.0] * k, 0.2)
            times.append(time.perf_counter() - t0)
        rows.append({"rule": rule, "numel": numel, "owner_s_per_round": statistics.median(times)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="fashion")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--H", type=int, default=30)
    p.add_argument("--attacks", default="scale,noise")
    p.add_argument("--cost-numel", type=int, default=10_000_000)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    pin_threads(1)
    from peer.trainer import load_task

    task = load_task(a.task, None)
    t0 = time.perf_counter()
    rows = [simulate(task, 4, a.H, a.rounds, "mean", None)]
    for attack in filter(None, a.attacks.split(",")):
        rows += [simulate(task, 5, a.H, a.rounds, rule, attack) for rule in RULES]
    honest = rows[0]["eval_loss"]
    for r in rows:
        r["vs_honest"] = r["eval_loss"] / honest
    cost = rule_cost(a.cost_numel, 5)
    out = {"bench": "robust", "task": a.task, "H": a.H, "rounds": a.rounds, "machine": machine(), "rows": rows,
           "cost": cost, "seconds": time.perf_counter() - t0}
    if a.json:
        emit_json(out)
        return 0
    print(f"robust aggregation: {a.task}, K=5 (one attacker) vs 4 honest, H={a.H}, {a.rounds} rounds, int8; "
          f"{machine()}")
    print(table(rows, [("attack", "attack", ""), ("rule", "rule", ""), ("eval_loss", "eval loss", ".4f"),
                       ("accuracy", "accuracy", ".3f"), ("vs_honest", "vs honest", ".3f"),
                       ("parts_left_out", "parts left out", "")]))
    print(table(cost, [("rule", "rule", ""), ("numel", "N", ","), ("owner_s_per_round", "owner s/round", ".3f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
