"""State transfer throughput: a joiner's GetState from a real donor daemon vs raw gRPC streaming.

    python -m bench.state_transfer [--params N] [--reps R] [--json]

Side by side, in one run, both over 127.0.0.1 with the server in another process:
  peer  a real ``Daemon`` (synthetic task of N params) serves its snapshot; the bench fetches it
        with the product's ``GrpcPeerClient.get_state`` (1 MiB chunks, idle timeout, the
        parameters' and the rest's digests computed while the chunks arrive) and decodes it with ``decode_state`` (size, shape,
        params-hash and finiteness checks), as a joiner does;
  raw   a bare grpc.aio server streams the same number of bytes in 1 MiB chunks of prebuilt
        protobuf messages to a client that only counts them: the ceiling of gRPC on loopback.
Both plain TCP (no TLS on either side), the same 1 MiB chunks, the same ~80 MB at N=10M (raw sends
the payload rounded up to whole chunks: a little more). Both servers run at once and the fetches
alternate between them, so that both see the same load. Prints MB/s (median of R fetches after
one warm-up each), the ratio peer/raw, and the CPU time of one fetch in the fetching process and
in the server process (medians; Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import emit_json, machine, pin_threads, summary

CHUNK = 1 << 20


def _server_main(kind: str, numel: int) -> None:
    """Child process: serve, print the address, run until stdin closes."""
    pin_threads(1)

    async def main() -> None:
        if kind == "peer":
            from peer.config import load_config
            from peer.daemon import Daemon

            # Plain TCP, like the raw gRPC stream it is compared with: this measures the transfer
            # path itself (bench.averaging measures what TLS costs).
            cfg = load_config({"run_id": "bench-state", "insecure": True, "task": "bench.tasks:synthetic",
                               "data": str(numel),
                               "listen": "127.0.0.1:0", "metrics_port": 0, "mdns": False, "threads": 1,
                               "state_dir": f"/tmp/bench-state-{os.getpid()}", "checkpoint_interval_s": 0}, env={})
            d = Daemon(cfg)
            await d.start()
            print(json.dumps({"address": d.address, "schema_hash": d.schema_hash}), flush=True)
            stop = d.stop
        else:
            import grpc

            payload = [b"\x01" * CHUNK] * (numel * 8 // CHUNK + 1)

            async def stream(request, context):
                for data in payload:
                    yield data

            server = grpc.aio.server()
            handler = grpc.method_handlers_generic_handler("raw.Raw", {
                "Get": grpc.unary_stream_rpc_method_handler(stream, request_deserializer=None,
                                                            response_serializer=None)})
            server.add_generic_rpc_handlers((handler,))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            print(json.dumps({"address": f"127.0.0.1:{port}"}), flush=True)

            async def stop():
                await server.stop(0)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await stop()

    asyncio.run(main())


async def _fetch_peer(address: str, schema_hash: str, numel: int) -> tuple[float, int]:
    from peer.sync.state import decode_state, max_blob_bytes
    from peer.transport import GrpcPeerClient

    client = GrpcPeerClient(chunk_bytes=CHUNK, chunk_idle_timeout_s=30, max_state_bytes=max_blob_bytes(numel))
    try:
        t0 = time.perf_counter()
        header, blob = await client.get_state(address, "bench-state", "bench", schema_hash, 120)
        decode_state(blob, numel, header)
        return time.perf_counter() - t0, len(blob)
    finally:
        await client.close()


async def _fetch_raw(address: str) -> tuple[float, int]:
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_stream("/raw.Raw/Get", request_serializer=None, response_deserializer=None)
        t0 = time.perf_counter()
        total = 0
        async for data in call(b"", timeout=120):
            total += len(data)
        return time.perf_counter() - t0, total


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all threads (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(numel: int, reps: int) -> dict[str, dict]:
    """Both servers up at once; the fetches alternate (raw, peer, peer, raw, ...) so that both
    see the same load on a shared machine, not one the quiet minute and the other the busy one."""
    procs = {kind: subprocess.Popen([sys.executable, "-m", "bench.state_transfer", "--serve", kind, "--params",
                                     str(numel)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for kind in ("peer", "raw")}
    try:
        info = {kind: json.loads(proc.stdout.readline()) for kind, proc in procs.items()}
        runs = {kind: {"seconds": [], "fetch_cpu": [], "serve_cpu": [], "size": 0} for kind in procs}
        for i in range(reps + 1):
            for kind in ("peer", "raw") if i % 2 else ("raw", "peer"):
                run, pid = runs[kind], procs[kind].pid
                cpu0, served0 = time.process_time(), _process_cpu_s(pid)
                if kind == "peer":
                    s, run["size"] = asyncio.run(_fetch_peer(info[kind]["address"], info[kind]["schema_hash"], numel))
                else:
                    s, run["size"] = asyncio.run(_fetch_raw(info[kind]["address"]))
                if i:  # the first fetch warms up (and builds the donor's snapshot)
                    run["seconds"].append(s)
                    run["fetch_cpu"].append(time.process_time() - cpu0)
                    run["serve_cpu"].append(_process_cpu_s(pid) - served0)
        out = {}
        for kind, run in runs.items():
            stats = summary(run["seconds"])
            # CPU per fetch (user + system, all threads): the steadier figure on a shared machine.
            out[kind] = {"system": kind, "bytes": run["size"], **stats,
                         "mb_per_s": run["size"] / stats["median_s"] / 1e6,
                         "fetch_cpu_s": statistics.median(run["fetch_cpu"]),
                         "serve_cpu_s": statistics.median(run["serve_cpu"])}
        return out
    finally:
        for proc in procs.values():
            proc.stdin.close()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", choices=["peer", "raw"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _server_main(args.serve, args.params)
        return 0
    pin_threads(1)
    measured = _measure(args.params, args.reps)
    peer, raw = measured["peer"], measured["raw"]
    result = {"bench": "state_transfer", "params": args.params, "machine": machine(), "peer": peer, "raw": raw,
              "ratio": peer["mb_per_s"] / raw["mb_per_s"]}
    if args.json:
        emit_json(result)
    else:
        print(f"state transfer, N={args.params:,} params ({peer['bytes']:,} bytes of state); {machine()}")
        for r in (peer, raw):
            print(f"  {r['system']:<5} {r['mb_per_s']:8.1f} MB/s  (median {r['median_s']:.3f} s, "
                  f"min {r['min_s']:.3f}, max {r['max_s']:.3f}; {r['bytes']:,} bytes; CPU per fetch: "
                  f"fetcher {r['fetch_cpu_s'] * 1e3:.0f} ms, server {r['serve_cpu_s'] * 1e3:.0f} ms)")
        print(f"  peer / raw: {result['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
