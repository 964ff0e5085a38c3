"""GPU checks of issue 14 (see bench/gpu_check.sh; run on an H200, bench/README.md "GPU check").

1. Codecs: a tensor on the device encodes to the same bytes as the same tensor on the host
   (sign1 may differ in a scale's last bit: its scale is a sum, whose order a GPU changes; that
   is reported, not failed), and a payload decodes onto the device to the host's values.
2. Bytes over the bus: int8 of a delta on the device moves a quarter of the float32 bytes;
   the time of encode-on-device + copy of the payload against copy-to-host + host encode.
3. Rounds applied on the device (``peer.sync.mirror``): the outer step on the device gives the
   host's bits, and a mirror advanced by int8 answers for 3 rounds holds the host's state bit
   for bit; the time of that against copying the float32 parameters to the device.
4. With 2+ CUDA devices: two local ranks (NCCL) take the steps of one process averaging both
   ranks' gradients (as tests/integration/test_local_workers.py does with gloo).

``--device cpu`` runs the same code on the host.
Prints one line per check and ``ALL OK`` at the end; exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def codecs(device: str) -> None:
    from peer.codec import CODEC_NAMES, get_codec

    gen = torch.Generator().manual_seed(5)
    sizes = [1, 255, 257, 100_003, 2**20 + 13, 10_000_000]
    for name in CODEC_NAMES:
        codec = get_codec(name)
        differed = 0
        for n in sizes:
            host = torch.randn(n, generator=gen) * 0.01
            data_host = codec.encode(host)
            on_dev = host.to(device)
            data_dev = codec.encode(on_dev) if device != "cpu" else codec.encode_torch(on_dev)
            if data_dev != data_host:
                diff = sum(a != b for a, b in zip(data_dev, data_host))
                if name == "sign1":
                    differed += 1
                    print(f"codec {name} n={n}: {diff} of {len(data_host)} bytes differ (scale sums; reported)")
                else:
                    raise SystemExit(f"FAIL codec {name} n={n}: {diff} of {len(data_host)} bytes differ")
            a = codec.decode(data_host, n)
            b = codec.decode(data_host, n, device=device) if device != "cpu" else codec.decode_torch(data_host, n)
            if b.device.type != torch.device(device).type or not torch.equal(a.view(torch.int32),
                                                                               b.cpu().view(torch.int32)):
                raise SystemExit(f"FAIL decode {name} n={n} on {device}")
        same = f"{device} bytes == host bytes" if not differed else f"{device} bytes differ in scales at {differed} sizes"
        print(f"codec {name}: {same}, decode on {device} == host decode ({len(sizes)} sizes)")


def bus(device: str) -> None:
    from peer.codec import get_codec

    codec = get_codec("int8")
    n = 50_000_000
    x = torch.randn(n, device=device) * 0.01

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    def best(fn, reps=5):
        fn()
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    on_device = best(lambda: codec.encode(x) if device != "cpu" else codec.encode_torch(x))
    via_host = best(lambda: codec.encode(x.cpu()))
    payload = codec.encoded_size(n)
    print(f"int8 bus: {n} floats, payload {payload / 4 / n:.3f} of the float32 bytes; encode on {device} + copy "
          f"payload {on_device * 1e3:.1f} ms vs copy float32 + host encode {via_host * 1e3:.1f} ms")


def mirror(device: str) -> None:
    from peer.codec import get_codec
    from peer.sync.mirror import Answers, DeviceMirror
    from peer.sync.outer import outer_step_hashed, step_in_place
    from peer.sync.round import shard_bounds
    from peer.sync.state import GlobalState

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a.cpu().view(torch.int32), b.view(torch.int32))

    gen = torch.Generator().manual_seed(11)
    n, params = 20_000_003, 19_999_990
    step = {"lr": 0.7, "momentum": 0.9, "param_numel": params, "int_slices": ((19_999_995, n),)}
    theta, grad, buf = (torch.randn(n, generator=gen) * s for s in (1.0, 1e-2, 1e-2))
    theta[19_999_995:] = torch.arange(8.0)
    host_p, host_b, _, _ = outer_step_hashed(theta, grad, buf, **step)
    dev_p, dev_b, dev_g = theta.to(device, copy=True), buf.to(device, copy=True), grad.to(device, copy=True)
    step_in_place(dev_p, dev_b, dev_g, **step)
    if not (same(dev_p, host_p) and same(dev_b, host_b)):
        wrong = int((dev_p.cpu().view(torch.int32) != host_p.view(torch.int32)).sum())
        raise SystemExit(f"FAIL outer step on {device}: {wrong} of {n} parameters differ from the host's")
    print(f"outer step on {device}: {n} values, bit for bit the host's")
    del dev_p, dev_b, dev_g

    codec = get_codec("int8")
    state = GlobalState(0, theta, torch.zeros(n))
    m = DeviceMirror(device, **step)
    m.start(state)
    applied, copied = [], []
    for rnd in range(3):
        avg = torch.randn(n, generator=gen) * 1e-2
        avg[19_999_995:] = 0
        answers = Answers("int8", tuple((a, b, codec.encode(avg[a:b])) for a, b in shard_bounds(n, 4)))
        decoded = torch.empty(n)
        for a, b, payload in answers.shards:
            codec.decode_into(payload, decoded[a:b])
        p, mom, digest, _ = outer_step_hashed(state.params, decoded, state.momentum, **step)
        after = GlobalState(rnd + 1, p, mom).with_hash(digest)
        sync()
        t0 = time.perf_counter()
        ok = m.advance(state, answers, after)
        sync()
        applied.append(time.perf_counter() - t0)
        if not ok or not same(m.start(after), after.params):
            raise SystemExit(f"FAIL mirror on {device} at round {rnd}: differs from the host's state")
        t0 = time.perf_counter()
        after.params.to(device, copy=True)
        sync()
        copied.append(time.perf_counter() - t0)
        state = after
    print(f"mirror on {device}: 3 int8 rounds, bit for bit the host's state; apply on {device} (answers over the "
          f"bus, decode, step, sampled check) {min(applied[1:]) * 1e3:.1f} ms vs copy float32 parameters "
          f"{min(copied) * 1e3:.1f} ms (first apply, compared in full: {applied[0] * 1e3:.1f} ms)")


def local_ranks() -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from peer.trainer.workers import LocalRanks, RankSpec

    spec = RankSpec(task="digits", data=None, seed=3, stream_id="s", device="cuda", threads=1, batch_size=16,
                    inner_lr=1e-3, rank=0, world=2, store_port=0, timeout_s=120.0, parent_pid=0)
    executor = ThreadPoolExecutor(1)
    ranks = LocalRanks(spec, executor, 3)

    async def run():
        await ranks.start()
        try:
            start = ranks.trainer.initial_params()
            res = await ranks.run(0, start, lambda: False)
            return res, ranks.ranks()
        finally:
            await ranks.close()

    res, info = asyncio.run(run())
    executor.shutdown()
    if res.samples != 2 * 16 * 3 or res.delta.device.type != "cuda" or not bool(torch.isfinite(res.delta).all()):
        raise SystemExit(f"FAIL local ranks: samples {res.samples}, delta on {res.delta.device}")
    print(f"local ranks (nccl): {[(r.rank, r.device, r.samples) for r in info]}, delta on {res.delta.device}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu to run the host variant)")
    print(f"device {args.device}" + (f": {torch.cuda.get_device_name()}" if args.device != "cpu" else ""))
    codecs(args.device)
    bus(args.device)
    mirror(args.device)
    if args.device != "cpu" and torch.cuda.device_count() >= 2:
        local_ranks()
    else:
        print("local ranks (nccl): skipped, needs 2 CUDA devices")
    print("ALL OK")


if __name__ == "__main__":
    sys.exit(main())
