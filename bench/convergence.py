"""Quality at equal samples: DiLoCo (K peers, quantized deltas) vs one process vs data-parallel.

    python -m bench.convergence [--tasks fashion,charlm] [--peers 4] [--rounds 25] [--H 30]
                                [--outer-lrs 0.3,0.5,0.7] [--codecs int8,fp32,sign1+ef] [--json]

A ONE-PROCESS SIMULATION of the DiLoCo math, to stay affordable on 2 cores: K ``InnerTrainer``s
(the product's inner loop, one data stream each, AdamW state kept across rounds) run H steps
from the shared parameters; their deltas go through the product's butterfly arithmetic with
its real functions: per-shard ``codec.encode``/``decode`` (``peer.codec``), ``ErrorFeedback``
residuals as ``peer.sync.round.Reducer`` keeps them (sender side, over the whole delta), the
owner's ``weighted_mean`` then one re-encode of the average, and ``peer.sync.outer.outer_step``
(Nesterov, momentum 0.9). No sockets. Bytes are the encoded payload sizes a real round sends.

Baselines on the same total samples (K * H * rounds batches):
* single: one ``InnerTrainer`` for K*H*rounds steps (same batch, same inner lr);
* ddp: K streams, gradients averaged every step (what gloo all_reduce computes, simulated in
  process), one AdamW step per K batches, H*rounds steps, lr constant or cosine to 0; bytes as
  a ring all-reduce of fp32 gradients: 2(K-1)/K * 4 * n per peer per step.

Codec variants: ``C`` (no error feedback), ``C+ef`` (product: sender-side EF), ``C+ef2``
(sender- and owner-side EF: the owner also carries the error of re-encoding the average).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from bench.common import emit_json, machine, pin_threads, table


def _variant(spec: str) -> tuple[str, int]:
    name, _, ef = spec.partition("+")
    return name, {"": 0, "ef": 1, "ef2": 2}[ef]


def diloco(task, k: int, h: int, rounds: int, outer_lr: float, spec: str, seed: int = 0) -> dict:
    import torch

    from peer.codec import ErrorFeedback, get_codec
    from peer.sync.aggregate import weighted_mean
    from peer.sync.outer import outer_step
    from peer.sync.round import shard_bounds
    from peer.trainer import InnerTrainer

    codec_name, ef_level = _variant(spec)
    codec = get_codec(codec_name)
    d = task.defaults
    trainers = [InnerTrainer(task, seed=seed, stream_id=f"w{i}", device="cpu", threads=1,
                             batch_size=d.batch_size, inner_lr=d.inner_lr) for i in range(k)]
    params = trainers[0].initial_params()
    n = params.numel()
    buf = torch.zeros_like(params)
    bounds = shard_bounds(n, k)
    sender_ef = [ErrorFeedback(codec, n) for _ in range(k)] if ef_level and codec.lossy else None
    owner_res = [torch.zeros(e - s) for s, e in bounds] if ef_level >= 2 and codec.lossy else None
    total_bytes = 0
    res_norm = []
    for _ in range(rounds):
        results = [t.run_inner(params, h) for t in trainers]
        parts = []  # parts[i][j]: peer i's decoded shard j
        for i, r in enumerate(results):
            comp = r.delta if sender_ef is None else r.delta + sender_ef[i].residual
            enc = [codec.encode(comp[s:e].contiguous()) for s, e in bounds]
            dec = [codec.decode(p, e - s) for p, (s, e) in zip(enc, bounds)]
            if sender_ef is not None:
                sender_ef[i].residual.copy_(comp - torch.cat(dec))
            total_bytes += sum(len(p) for j, p in enumerate(enc) if j != i)
            parts.append(dec)
        avg_shards = []
        for j, (s, e) in enumerate(bounds):
            mean = weighted_mean([parts[i][j] for i in range(k)], [float(r.samples) for r in results])
            if owner_res is not None:
                mean = mean + owner_res[j]
            payload = codec.encode(mean)
            dec = codec.decode(payload, e - s)
            if owner_res is not None:
                owner_res[j] = mean - dec
            total_bytes += (k - 1) * len(payload)
            avg_shards.append(dec)
        avg = torch.cat(avg_shards)
        if sender_ef is not None:
            res_norm.append(float(sender_ef[0].residual.norm() / max(1e-12, float(results[0].delta.norm()))))
        params, buf = outer_step(params, avg, buf, lr=outer_lr, momentum=d.outer_momentum)
    ev = trainers[0].evaluate(params)
    out = {"method": "diloco", "codec": spec, "outer_lr": outer_lr, "H": h, "rounds": rounds,
           "eval_loss": ev["loss"], "accuracy": ev.get("accuracy"), "total_bytes": total_bytes}
    if res_norm:
        out["residual_over_delta"] = sum(res_norm) / len(res_norm)
    return out


def single(task, k: int, h: int, rounds: int, seed: int = 0) -> dict:
    from peer.trainer import InnerTrainer

    d = task.defaults
    t = InnerTrainer(task, seed=seed, stream_id="single", device="cpu", threads=1, batch_size=d.batch_size,
                     inner_lr=d.inner_lr)
    p0 = t.initial_params()
    r = t.run_inner(p0, k * h * rounds)
    ev = t.evaluate(p0 - r.delta)
    return {"method": "single", "codec": "-", "outer_lr": None, "H": k * h * rounds, "rounds": 1,
            "eval_loss": ev["loss"], "accuracy": ev.get("accuracy"), "total_bytes": 0}


def ddp(task, k: int, steps: int, schedule: str, seed: int = 0) -> dict:
    import torch

    from peer.trainer import init_model

    d = task.defaults
    model = init_model(task, seed)
    model.train()
    opt = task.make_inner_optimizer(model.parameters(), d.inner_lr)
    streams = [task.batches(seed, f"w{i}", d.batch_size) for i in range(k)]
    n = sum(p.numel() for p in model.parameters())
    for step in range(steps):
        if schedule == "cosine":
            for g in opt.param_groups:
                g["lr"] = d.inner_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        for s in streams:
            (task.loss(model, next(s)) / k).backward()  # = mean of the K ranks' gradients
        opt.step()
    model.eval()
    with torch.no_grad():
        ev = task.evaluate(model, torch.device("cpu"))
    return {"method": f"ddp-{schedule}", "codec": "fp32", "outer_lr": None, "H": 1, "rounds": steps,
            "eval_loss": ev["loss"], "accuracy": ev.get("accuracy"),
            "total_bytes": int(steps * k * 2 * (k - 1) / k * 4 * n)}


def run(tasks, k, rounds, h_by_task, outer_lrs, codecs, ddp_schedules, time_limit_s: float) -> dict:
    from peer.trainer import load_task

    pin_threads(1)
    rows = []
    t_end = time.monotonic() + time_limit_s
    skipped = []
    for name in tasks:
        task = load_task(name)
        h = h_by_task.get(name, task.defaults.inner_steps)
        jobs = [("ddp", s) for s in ddp_schedules] + [("single", None)]
        jobs += [("diloco", (c, lr)) for c in codecs for lr in outer_lrs]
        for kind, arg in jobs:
            if time.monotonic() > t_end:
                skipped.append(f"{name}:{kind}:{arg}")
                continue
            t0 = time.monotonic()
            if kind == "ddp":
                row = ddp(task, k, h * rounds, arg)
            elif kind == "single":
                row = single(task, k, h, rounds)
            else:
                row = diloco(task, k, h, rounds, arg[1], arg[0])
            row.update(task=name, seconds=time.monotonic() - t0)
            rows.append(row)
            print(f"  {name} {row['method']} {row['codec']} lr={row['outer_lr']}: loss {row['eval_loss']:.4f} "
                  f"acc {row['accuracy']} ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
        ref = next((r for r in rows if r["task"] == name and r["method"] == "ddp-constant"), None)
        for r in rows:
            if r["task"] == name and ref is not None:
                r["loss_vs_ddp"] = r["eval_loss"] / ref["eval_loss"] - 1
                if r.get("accuracy") is not None and ref.get("accuracy") is not None:
                    r["acc_vs_ddp"] = r["accuracy"] - ref["accuracy"]
                r["bytes_vs_ddp"] = ref["total_bytes"] / r["total_bytes"] if r["total_bytes"] else None
    return {"bench": "convergence", "simulation": "one process, product codec/ErrorFeedback/outer_step",
            "peers": k, "rounds": rounds, "machine": machine(), "rows": rows, "skipped_for_time": skipped}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="fashion,charlm")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--H", default="", help="task=H,... (default: the task's inner_steps)")
    p.add_argument("--outer-lrs", default="0.3,0.5,0.7")
    p.add_argument("--codecs", default="int8,fp32,sign1,sign1+ef,sign1+ef2")
    p.add_argument("--ddp", default="constant,cosine")
    p.add_argument("--time-limit", type=float, default=1800.0, help="skip remaining runs after this many s")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    h_by_task = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in a.H.split(",") if kv}
    res = run(a.tasks.split(","), a.peers, a.rounds, h_by_task, [float(x) for x in a.outer_lrs.split(",")],
              a.codecs.split(","), a.ddp.split(","), a.time_limit)
    if a.json:
        emit_json(res)
        return 0
    print(f"convergence ({res['simulation']}): K={a.peers}, {a.rounds} outer rounds; {res['machine']}")
    print(table(res["rows"], [
        ("task", "task", ""), ("method", "method", ""), ("codec", "codec", ""), ("outer_lr", "outer lr", ""),
        ("eval_loss", "eval loss", ".4f"), ("accuracy", "acc", ".4f"), ("loss_vs_ddp", "loss vs ddp", "+.1%"),
        ("acc_vs_ddp", "acc vs ddp", "+.4f"), ("total_bytes", "bytes", ".3g"), ("bytes_vs_ddp", "ddp/bytes", ".0f"),
        ("residual_over_delta", "|r|/|d|", ".2f")]))
    if res["skipped_for_time"]:
        print("skipped for time: " + ", ".join(res["skipped_for_time"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
