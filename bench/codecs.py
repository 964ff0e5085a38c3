"""Codec throughput against a plain copy of the same tensor.

    python -m bench.codecs [--numel N] [--reps R] [--threads T] [--json]

GB/s counts float32 input bytes (4 * numel) per second. Each figure is the median of ``reps``
timed calls after one warm-up; the baseline is ``x.clone()`` (a memcpy into a fresh tensor,
page faults included, as decode pays them too). The ratio column is codec GB/s over clone GB/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.common import emit_json, machine, pin_threads, table


def _median_seconds(fn, reps: int) -> float:
    fn()  # warm-up: allocator, page cache, lazy init
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(numel: int, reps: int, threads: int) -> dict:
    pin_threads(threads)
    import torch

    from peer.codec import CODEC_NAMES, get_codec

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=gen) * 1e-3  # the scale of a typical pseudo-gradient
    gb = 4 * numel / 1e9
    clone_s = _median_seconds(lambda: x.clone(), reps)
    clone_gbs = gb / clone_s
    rows = []
    for name in CODEC_NAMES:
        codec = get_codec(name)
        data = codec.encode(x)
        enc_s = _median_seconds(lambda: codec.encode(x), reps)
        dec_s = _median_seconds(lambda: codec.decode(data, numel), reps)
        err = float((codec.decode(data, numel) - x).abs().max())
        rows.append({
            "codec": name,
            "bytes": len(data),
            "compression": 4 * numel / len(data),
            "encode_gbs": gb / enc_s,
            "decode_gbs": gb / dec_s,
            "roundtrip_gbs": gb / (enc_s + dec_s),
            "encode_x_clone": (gb / enc_s) / clone_gbs,
            "decode_x_clone": (gb / dec_s) / clone_gbs,
            "roundtrip_x_clone": (gb / (enc_s + dec_s)) / clone_gbs,
            "max_abs_err": err,
            "error_bound": codec.error_bound(x),
        })
    return {"bench": "codecs", "numel": numel, "reps": reps, "threads": threads, "machine": machine(),
            "clone_gbs": clone_gbs, "codecs": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=10_000_000)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as in the daemon)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args.numel, args.reps, args.threads)
    if args.json:
        emit_json(result)
        return
    print(f"codecs: numel {args.numel:,} fp32 ({4 * args.numel / 1e6:.1f} MB), torch threads {args.threads}, "
          f"median of {args.reps}; {result['machine']}")
    print(f"baseline x.clone(): {result['clone_gbs']:.2f} GB/s")
    print(table(result["codecs"], [
        ("codec", "codec", ""), ("compression", "ratio", ".2f"), ("encode_gbs", "enc GB/s", ".2f"),
        ("decode_gbs", "dec GB/s", ".2f"), ("roundtrip_gbs", "enc+dec GB/s", ".2f"),
        ("encode_x_clone", "enc/clone", ".2f"), ("decode_x_clone", "dec/clone", ".2f"),
        ("roundtrip_x_clone", "enc+dec/clone", ".2f"), ("max_abs_err", "max err", ".2e"),
        ("error_bound", "bound", ".2e"),
    ]))


if __name__ == "__main__":
    main()
