"""Command line: ``peer run | keys | peers | status | export | demo``. The only place that calls sys.exit."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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
            # `--insecure` alone means on; `--overlap off` still works.
            p.add_argument(flag, dest=name, default=None, nargs="?", const="on",
                           choices=["on", "off", "true", "false"], help=f"[{section}] on|off")
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

    keys = sub.add_parser("keys", help="run credentials").add_subparsers(dest="keys_command", required=True)
    new = keys.add_parser("new", help="create a run CA: copying its directory to a machine admits that machine",
                          description="Write DIR/ca.crt and DIR/ca.key (0600) for run ID. Every peer of the run "
                                      "starts with --credentials DIR; its peer id is derived from its own key.")
    new.add_argument("--run-id", required=True)
    new.add_argument("--out", required=True, metavar="DIR")

    peers = sub.add_parser("peers", help="list the peers of a run seen by mDNS")
    peers.add_argument("--run-id", default=None, help="run to list (default: every run)")
    peers.add_argument("--interface", dest="interfaces", action="append", default=None, metavar="ADDR")
    peers.add_argument("--timeout", type=float, default=3.0, help="seconds to listen (default 3)")
    peers.add_argument("--json", action="store_true")

    status = sub.add_parser("status", help="ask one daemon what it is doing")
    status.add_argument("address", metavar="HOST:PORT")
    status.add_argument("--timeout", type=float, default=5.0)
    status.add_argument("--credentials", default=None, metavar="DIR",
                        help="the run's credentials (needed unless the daemon runs --insecure)")
    status.add_argument("--json", action="store_true")

    export = sub.add_parser(
        "export", help="write the global model as .safetensors (from a running peer or a state dir)",
        description="Write the swarm's current global model (parameters and buffers, with the task model's own "
                    "state_dict names) to a .safetensors file that model.load_state_dict(load_file(...)) reads; "
                    "metadata: run_id, round, global_hash, task. Either from a running peer (HOST:PORT) or "
                    "from a peer's state directory (its newest checkpoint). Nothing is overwritten on error.")
    export.add_argument("address", nargs="?", default=None, metavar="HOST:PORT", help="a running peer")
    export.add_argument("--state-dir", default=None, metavar="DIR", help="a peer's state directory instead")
    export.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    export.add_argument("--credentials", default=None, metavar="DIR",
                        help="the run's credentials (needed for a peer unless it runs --insecure)")
    export.add_argument("--task", default=None, help="the task (default: the one the peer or checkpoint names)")
    export.add_argument("--data", default=None, help="the task's data, if the peer was given --data")
    export.add_argument("--timeout", type=float, default=60.0, help="seconds for the state transfer (default 60)")

    demo = sub.add_parser("demo", help="start several local peers training together and show progress",
                          description="Start local peers on 127.0.0.1 that train one model together, plus one "
                                      "peer training alone for comparison; show their progress live and end "
                                      "with a summary. Defaults measured in peer/demo.py.")
    demo.add_argument("--peers", type=int, default=3, help="peers training together (2-16, default 3)")
    demo.add_argument("--task", default="fashion", help="task of every peer (default fashion)")
    demo.add_argument("--data", default=None, help="the task's data (default: the task's own)")
    demo.add_argument("--rounds", type=int, default=30, help="each peer stops after this many rounds (default 30)")
    demo.add_argument("--inner-steps", type=int, default=50, help="inner steps per round (default 50)")
    demo.add_argument("--inner-lr", type=float, default=5e-4, help="inner AdamW learning rate (default 5e-4)")
    demo.add_argument("--codec", default="int8", help="codec of the averaged deltas (default int8)")
    demo.add_argument("--run-id", default=None, help="run id of the peers (default: demo-<pid>)")
    demo.add_argument("--base-port", type=int, default=0, help="first gRPC port (default: free ports)")
    demo.add_argument("--state-dir", default=None,
                      help="logs and state (default: a new temporary directory; an earlier demo's directory "
                           "resumes from its checkpoints)")
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
    from peer.trainer.workers import Torchrun, torchrun_worker

    # Under torchrun, rank 0 is the peer and the other ranks serve its inner phases.
    torchrun = Torchrun.from_env(os.environ)
    if torchrun is not None and torchrun.rank > 0:
        return torchrun_worker(torchrun, cfg.timeouts.local_rank_timeout_s)
    from peer.daemon import run_daemon

    try:
        import uvloop

        return uvloop.run(run_daemon(cfg, torchrun))
    except ImportError:  # pragma: no cover (uvloop is a dependency; not on every platform)
        return asyncio.run(run_daemon(cfg, torchrun))


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


def _keys(args: argparse.Namespace) -> int:
    from peer.config import validate_run_id
    from peer.credentials import CA_CERT, CA_KEY, create_run_credentials

    validate_run_id(args.run_id)
    out = create_run_credentials(args.run_id, args.out)
    print(f"run credentials for {args.run_id!r} in {out}: {CA_CERT}, {CA_KEY} (0600)")
    print(f"copy {out} to every machine of the run (it admits them), then: peer run --run-id {args.run_id} "
          f"--credentials {out}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from peer.client import get_status, human_bytes

    from peer.errors import PeerUnavailable

    try:
        s = get_status(args.address, args.timeout, args.credentials)
    except PeerUnavailable as exc:
        if args.credentials:
            raise
        raise PeerUnavailable(f"{exc} (a daemon that runs with run credentials answers only to their holders: "
                              f"pass --credentials DIR)") from None
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"peer {s['peer_id']}  run {s['run_id']}  task {s['task']}  at {s['address']}")
    print(f"  round {s['round']} ({s['phase']}), inner step {s['inner_step']}, samples {s['samples']}")
    print(f"  loss {fmt(s['loss'])}  eval loss {fmt(s['eval_loss'])}  eval accuracy {fmt(s['eval_accuracy'])}")
    print(f"  rounds completed {s['rounds_completed']}, failed {s['rounds_failed']}, last round "
          f"{s['last_round_s']:.2f} s")
    print(f"  codec {s['codec']}, sent {human_bytes(s['bytes_sent'])}, received {human_bytes(s['bytes_received'])}")
    print(f"  peers ({len(s['peers'])}): {', '.join(s['peers']) or '-'}")
    if s["local_ranks"]:
        print(f"  local ranks ({len(s['local_ranks'])}): " + ", ".join(
            f"{r['rank']} pid {r['pid']} {r['device']} {'up' if r['alive'] else 'DEAD'} {r['samples']} samples"
            for r in s["local_ranks"]))
    print(f"  global hash   {s['global_hash']}")
    print("  connection: mutual TLS with the run's credentials" if args.credentials else
          "  connection: plain TCP: this daemon runs --insecure (anyone on its network can join the run)")
    host = s["address"].rsplit(":", 1)[0] or "HOST"
    print(f"  metrics http://{host}:{s['metrics_port']}/metrics  (swarm targets: /sd)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from peer.errors import ConfigError, PeerUnavailable

    if (args.address is None) == (args.state_dir is None):
        raise ConfigError("export needs exactly one source: a running peer HOST:PORT or --state-dir DIR")
    import torch

    torch.set_num_threads(1)  # a one-off tool beside running peers: do not take every core
    from peer.export import export_from_peer, export_from_state_dir

    if args.state_dir is not None:
        done = export_from_state_dir(args.state_dir, args.out, task=args.task, data=args.data)
    else:
        try:
            done = export_from_peer(args.address, args.out, credentials=args.credentials, task=args.task,
                                    data=args.data, timeout_s=args.timeout)
        except PeerUnavailable as exc:
            if args.credentials:
                raise
            raise PeerUnavailable(f"{exc} (a daemon that runs with run credentials answers only to their holders: "
                                  f"pass --credentials DIR)") from None
    print(f"exported round {done.round} of task {done.task} ({done.tensors} tensors, global hash "
          f"{done.global_hash[:16]}...) to {done.path}")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            code = _run(args)
        elif args.command == "keys":
            code = _keys(args)
        elif args.command == "peers":
            code = _peers(args)
        elif args.command == "status":
            code = _status(args)
        elif args.command == "export":
            code = _export(args)
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
