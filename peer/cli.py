"""Command line: ``peer run | peers | status | demo``. The only place that calls sys.exit."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys

from peer.config import FIELDS, load_config
from peer.errors import PeerError

log = logging.getLogger("peer")

# Flags of `peer run` beyond the ones the config module derives from every setting.
_REPEATABLE = {"interface": "interfaces", "peer": "peers"}


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config setting (``--inner-steps``), plus the repeatable list flags."""
    for name, (section, f) in FIELDS.items():
        if name in ("interfaces", "peers"):
            continue
        flag = "--" + name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "bool" in kind:
            p.add_argument(flag, dest=name, default=None, choices=["on", "off", "true", "false"],
                           help=f"[{section}] on|off")
        else:
            p.add_argument(flag, dest=name, default=None, help=f"[{section}] {name}")
    p.add_argument("--interface", dest="interfaces", action="append", default=None, metavar="ADDR",
                   help="IPv4 address on which mDNS runs (repeatable; default: all interfaces)")
    p.add_argument("--peer", dest="peers", action="append", default=None, metavar="HOST:PORT",
                   help="static peer for networks without multicast (repeatable)")
    p.add_argument("--faults", dest="faults", default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peer", description="Peer-to-peer DiLoCo training daemon.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", default=None, help="TOML config file")
    _add_setting_flags(run)

    peers = sub.add_parser("peers", help="list the peers of a run seen by mDNS")
    peers.add_argument("--run-id", default=None, help="run to list (default: every run)")
    peers.add_argument("--interface", dest="interfaces", action="append", default=None, metavar="ADDR")
    peers.add_argument("--timeout", type=float, default=3.0, help="seconds to listen (default 3)")
    peers.add_argument("--json", action="store_true")

    status = sub.add_parser("status", help="ask one daemon what it is doing")
    status.add_argument("address", metavar="HOST:PORT")
    status.add_argument("--timeout", type=float, default=5.0)
    status.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="start several local peers training together and show progress")
    demo.add_argument("--peers", type=int, default=3)
    demo.add_argument("--task", default="digits")
    demo.add_argument("--rounds", type=int, default=30, help="stop when every peer reached this round")
    demo.add_argument("--codec", default="int8")
    demo.add_argument("--run-id", default="demo")
    demo.add_argument("--base-port", type=int, default=0, help="first gRPC port (default: free ports)")
    demo.add_argument("--state-dir", default=None, help="default: a temporary directory")
    demo.add_argument("--inner-steps", type=int, default=None)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from peer.config import SECTIONS  # noqa: F401  (keeps config the single source of names)

    cli = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    if args.faults:
        cli["faults"] = args.faults
    cfg = load_config(cli, config_file=args.config)
    _setup_logging(cfg.run.log_level)
    # Before torch is imported, so that OpenMP starts with this many threads; InnerTrainer sets
    # torch's own count.
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.train.threads))
    from peer.daemon import run_daemon

    try:
        import uvloop

        return uvloop.run(run_daemon(cfg))
    except ImportError:  # pragma: no cover (uvloop is a dependency; not on every platform)
        return asyncio.run(run_daemon(cfg))


def _peers(args: argparse.Namespace) -> int:
    from peer.discovery import browse_once

    records = asyncio.run(browse_once(args.run_id, args.interfaces or None, args.timeout))
    rows = [{"peer_id": r.peer_id, "run_id": r.run_id, "address": r.address, "metrics": r.metrics_address}
            for r in records]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no peers{' of run ' + args.run_id if args.run_id else ''} seen in {args.timeout:g} s")
    else:
        _table(rows, ["peer_id", "run_id", "address", "metrics"])
    return 0


def _table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip())


def status_dict(s) -> dict:
    nan = lambda x: None if isinstance(x, float) and math.isnan(x) else x  # noqa: E731
    return {
        "peer_id": s.peer.peer_id, "run_id": s.peer.run_id, "task": s.peer.task, "address": s.peer.address,
        "round": s.peer.round, "inner_step": s.inner_step, "loss": nan(s.loss), "eval_loss": nan(s.eval_loss),
        "eval_accuracy": nan(s.eval_accuracy), "global_sha256": s.peer.global_hash, "peers": list(s.peers),
        "phase": s.phase, "codec": s.codec, "samples": s.samples, "bytes_sent": s.bytes_sent,
        "bytes_received": s.bytes_received, "last_round_s": s.last_round_s,
        "rounds_completed": s.rounds_completed, "rounds_failed": s.rounds_failed,
        "metrics_port": s.peer.metrics_port,
    }


async def fetch_status(address: str, timeout_s: float):
    from peer.transport import GrpcPeerClient

    client = GrpcPeerClient(chunk_bytes=1 << 20, chunk_idle_timeout_s=timeout_s)
    try:
        return await client.status(address, timeout_s)
    finally:
        await client.close()


def _status(args: argparse.Namespace) -> int:
    s = status_dict(asyncio.run(fetch_status(args.address, args.timeout)))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"peer {s['peer_id']}  run {s['run_id']}  task {s['task']}  at {s['address']}")
    print(f"  round {s['round']} ({s['phase']}), inner step {s['inner_step']}, samples {s['samples']}")
    print(f"  loss {fmt(s['loss'])}  eval loss {fmt(s['eval_loss'])}  eval accuracy {fmt(s['eval_accuracy'])}")
    print(f"  rounds completed {s['rounds_completed']}, failed {s['rounds_failed']}, last round "
          f"{s['last_round_s']:.2f} s")
    print(f"  codec {s['codec']}, sent {_human(s['bytes_sent'])}, received {_human(s['bytes_received'])}")
    print(f"  peers ({len(s['peers'])}): {', '.join(s['peers']) or '-'}")
    print(f"  global sha256 {s['global_sha256']}")
    host = s["address"].rsplit(":", 1)[0] or "HOST"
    print(f"  metrics http://{host}:{s['metrics_port']}/metrics  (swarm targets: /sd)")
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            code = _run(args)
        elif args.command == "peers":
            code = _peers(args)
        elif args.command == "status":
            code = _status(args)
        else:
            from peer.demo import run_demo

            code = run_demo(args)
    except PeerError as exc:
        print(f"peer: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
