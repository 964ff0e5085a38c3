"""One peer over two local ranks (``--local-workers 2``): gloo on CPU, real processes and sockets."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from peer.trainer.params import assign_flat_state, flatten_state
from peer.trainer.schedule import LRSchedule
from peer.trainer.task import init_model, load_task
from peer.trainer.workers import LocalRankError, LocalRanks, RankSpec
from tests.integration._peers import Swarm, consistent_rounds, metric, round_hashes, wait_until

SEED, BATCH, LR, STEPS = 3, 16, 1e-3, 3


def _spec(**kw) -> RankSpec:
    base = dict(task="digits", data=None, seed=SEED, stream_id="s", device="cpu", threads=1, batch_size=BATCH,
                inner_lr=LR, rank=0, world=2, store_port=0, timeout_s=60.0, parent_pid=0)
    return RankSpec(**{**base, **kw})


def _reference(phases: int, schedule: LRSchedule | None = None, bf16: bool = False) -> list[torch.Tensor]:
    """The same phases in one process: each step averages the gradients of rank 0's batch
    (stream "s") and rank 1's batch (stream "s/rank1"), weighted by samples; at the inner
    learning rate of ``schedule`` at step ``phase * STEPS + i``, each loss under bf16 autocast
    when ``bf16``."""
    task = load_task("digits")
    model = init_model(task, SEED)
    opt = task.make_inner_optimizer(model.parameters(), LR)
    streams = [task.batches(SEED, "s", BATCH), task.batches(SEED, "s/rank1", BATCH)]
    start = flatten_state(model)
    deltas = []
    for phase in range(phases):
        assign_flat_state(model, start)
        for i in range(STEPS):
            for group in opt.param_groups:
                group["lr"] = task.inner_lr(phase * STEPS + i, LR, schedule or LRSchedule())
            summed = None
            total = 0
            for stream in streams:
                x, y = next(stream)
                model.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = task.loss(model, (x, y))
                loss.float().backward()
                g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * x.shape[0]
                summed = g if summed is None else summed + g
                total += x.shape[0]
            avg = summed / total
            offset = 0
            for p in model.parameters():
                p.grad = avg[offset: offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            opt.step()
        delta = start - flatten_state(model)
        deltas.append(delta)
        start = start - delta
    return deltas


async def _two_phases(ranks: LocalRanks):
    """Two inner phases from the task's initial parameters, each from where the last one ended
    (as after a round of one): their results, and the parameters after them."""
    start = ranks.trainer.initial_params()
    results = []
    for rnd in range(2):
        res = await ranks.run(rnd, start, lambda: False)
        results.append(res)
        start = start - res.delta
    return results, start


def test_two_ranks_take_the_steps_of_one_process_on_both_batches_and_a_dead_rank_fails(tmp_path):
    failures: list[str] = []
    executor = ThreadPoolExecutor(1, thread_name_prefix="trainer")
    ranks = LocalRanks(_spec(), executor, STEPS, on_failure=failures.append)

    async def scenario():
        await ranks.start()
        try:
            results, start = await _two_phases(ranks)
            info = ranks.ranks()
            pid = info[1].pid
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(LocalRankError, match=r"local rank 1 \(pid \d+\) was killed by signal 9"):
                for rnd in range(2, 10):  # the watch may notice first, or a collective fails
                    await ranks.run(rnd, start, lambda: False)
                    await asyncio.sleep(0.3)
            deadline = time.monotonic() + 3
            while not failures and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return results, info
        finally:
            await ranks.close()

    try:
        results, info = asyncio.run(scenario())
    finally:
        executor.shutdown(wait=True)
    # Assert: the same parameters as one process averaging both ranks' gradients, step by step
    # (optimizer state carried across phases), and the samples of both ranks
    for got, want in zip(results, _reference(2)):
        assert torch.allclose(got.delta, want, rtol=0, atol=1e-6), (got.delta - want).abs().max()
        assert got.delta.abs().max() > 0
    assert [r.samples for r in results] == [2 * BATCH * STEPS] * 2
    assert [(r.rank, r.alive, r.samples) for r in info] == [(0, True, 2 * BATCH * STEPS), (1, True, 2 * BATCH * STEPS)]
    # ... and the dead rank was reported as a failure of the peer
    assert failures and re.match(r"local rank 1 \(pid \d+\) was killed by signal 9", failures[0]), failures


def test_two_ranks_follow_the_learning_rate_schedule_and_bf16_of_one_process():
    # Prepare: a cosine schedule with warm-up over the two phases' six steps, bf16 autocast
    schedule = LRSchedule("cosine", warmup_steps=2, total_steps=6)
    executor = ThreadPoolExecutor(1, thread_name_prefix="trainer")
    ranks = LocalRanks(_spec(precision="bf16", inner_lr_schedule="cosine", warmup_steps=2, total_steps=6),
                       executor, STEPS)

    async def scenario():
        await ranks.start()
        try:
            return (await _two_phases(ranks))[0]
        finally:
            await ranks.close()

    # Execute
    try:
        results = asyncio.run(scenario())
    finally:
        executor.shutdown(wait=True)
    # Assert: one process's steps on both batches at the schedule's rates, under bf16; the rate
    # of each phase's last step reported
    for got, want in zip(results, _reference(2, schedule, bf16=True)):
        assert torch.allclose(got.delta, want, rtol=0, atol=1e-6), (got.delta - want).abs().max()
        assert got.delta.abs().max() > 0
    assert [r.lr for r in results] == [LR * schedule.factor(2), LR * schedule.factor(5)]
    # ... and those are not the constant rate's steps (the schedule did something)
    plain = _reference(2)
    assert not torch.allclose(results[1].delta, plain[1], rtol=0, atol=1e-6)


def _together(a, b) -> list[int]:
    """The rounds both peers completed since their first round in one group; asserts that the
    two logged the same global hash after each of them."""
    ha, hb = round_hashes(a.log()), round_hashes(b.log())
    shared = consistent_rounds([a, b])
    assert shared, (ha, hb)
    common = [r for r in sorted(set(ha) & set(hb)) if r >= shared[0]]
    assert all(ha[r] == hb[r] for r in common), {r: (ha[r], hb[r]) for r in common}
    assert len(common) >= 3, (ha, hb)
    return common


def _logs(swarm: Swarm) -> str:
    return "\n".join(f"--- {p.name}\n{p.tail(30)}" for p in swarm.peers)


def test_a_two_rank_peer_and_a_plain_peer_train_together_and_a_dead_rank_ends_only_its_peer(tmp_path):
    dump = tmp_path / "dump"
    args = ["--device", "cpu", "--dump-dir", str(dump), "--rounds", "0"]
    with Swarm(tmp_path, f"local-{os.getpid()}", args) as swarm:
        # Prepare: a two-rank peer and a one-rank peer
        wide = swarm.start("wide", "--local-workers", "2", wait=False)
        plain = swarm.start("plain", wait=False)
        for p in (wide, plain):
            p.wait_listening(90)
        # Execute: three rounds together (each may train alone until it sees the other)
        wait_until(lambda: len(consistent_rounds([wide, plain])) >= 3, 90, "three rounds in one group",
                   lambda: _logs(swarm))
        status = wide.status()
        samples_rank1 = metric(wide.metrics_port, 'peer_train_rank_samples_total{rank="1"}')
        worker = int(re.search(r"local rank 1 started: pid (\d+)", wide.log())[1])

        # Assert 1: once together, identical global hashes after every round both completed
        common = _together(wide, plain)
        # Assert 2: the two-rank peer counts twice the samples of the one-rank peer per round
        for r in common:
            weights = [json.loads((dump / p.peer_id / f"round{r:05d}.json").read_text())["weight"]
                       for p in (wide, plain)]
            assert weights[0] == 2 * weights[1] > 0, (r, weights)
        # Assert 3: status and metrics show the local ranks
        ranks = status["local_ranks"]
        assert [(r["rank"], r["alive"]) for r in ranks] == [(0, True), (1, True)], status
        assert ranks[1]["pid"] == worker and ranks[0]["samples"] == ranks[1]["samples"] > 0
        assert samples_rank1 > 0
        assert plain.status()["local_ranks"] == []

        # Execute: kill the worker rank
        before = max(round_hashes(plain.log()))
        os.kill(worker, signal.SIGKILL)
        # Assert 4: its peer exits non-zero with a clear line; the other peer goes on alone
        code = wide.proc.wait(30)
        assert code != 0, wide.tail()
        assert re.search(rf"local rank 1 \(pid {worker}\) was killed by signal 9", wide.log()), wide.tail()
        wait_until(lambda: max(round_hashes(plain.log())) >= before + 2, 60,
                   "the plain peer to complete two more rounds", lambda: _logs(swarm))
        assert plain.alive()


def test_a_peer_under_torchrun_trains_with_its_ranks(tmp_path):
    dump = tmp_path / "dump"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python"]
    with Swarm(tmp_path, f"torchrun-{os.getpid()}", ["--device", "cpu", "--dump-dir", str(dump), "--rounds", "0"]) \
            as swarm:
        # Prepare: rank 0 of a torchrun launch is the peer; a plain peer trains with it
        wide = swarm.start("torchrun", netns_argv=torchrun, wait=False)
        plain = swarm.start("plain", wait=False)
        for p in (wide, plain):
            p.wait_listening(90)
        status = wait_until(lambda: (s := wide.status())["local_ranks"] and s, 60, "the ranks in status",
                            lambda: _logs(swarm))
        # Execute: three rounds together
        wait_until(lambda: len(consistent_rounds([wide, plain])) >= 3, 90, "three rounds in one group",
                   lambda: _logs(swarm))
        # Assert: equal hashes after every round together, twice the weight, the torchrun rank in status
        common = _together(wide, plain)
    for r in common:
        weights = [json.loads((dump / p.peer_id / f"round{r:05d}.json").read_text())["weight"] for p in (wide, plain)]
        assert weights[0] == 2 * weights[1] > 0, (r, weights)
    worker = int(re.search(r"local rank 1 \(torchrun\): pid (\d+)", wide.log())[1])
    assert [(r["rank"], r["pid"] == worker, r["alive"]) for r in status["local_ranks"]][1] == (1, True, True)
