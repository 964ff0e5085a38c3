"""Round time of averaging N float32 values across K processes: peer vs gloo vs hivemind.

    python -m bench.averaging --system peer|gloo|hivemind --peers K --params N --codec C
                              [--rounds R] [--warmup W] [--link 1gbit|100mbit] [--json]

K worker processes on 127.0.0.1 (or, with ``--link``, one per network namespace on a shared
bridge with every link rate-limited) average a deterministic random tensor per (rank, round),
so each worker also computes the exact float64 mean and reports its max abs error.

* ``peer``: each worker runs a real ``peer.daemon.Daemon`` (static peers, synthetic task of N
  parameters, error feedback off so the error is the codec's alone) and calls ``round_once``:
  matchmaking, butterfly all-reduce over gRPC streams, codec, outer step. Bytes come from the
  daemon's payload counters.
* ``gloo``: ``torch.distributed`` gloo ``all_reduce`` of fp32 (then / K).
* ``hivemind``: ``DecentralizedAverager.step()`` with ``Uniform8BitQuantization`` (int8) or
  ``NoCompression`` (fp32), run with bench/.venv-hivemind's python (create it with
  ``bench/setup_hivemind.sh``).

The parent has every worker build its round's inputs (``prepare``), then releases the round to
all workers at once (a barrier over stdin), so neither skew between processes nor one worker's
input building during another's round counts. A round's time is the slowest worker's; figures are over ``rounds``
timed rounds after ``warmup`` untimed ones. Every worker runs with one torch thread and is
killed in a ``finally``; namespaces are deleted in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import PHASES, emit_json, machine, summary, throwaway_credentials

REPO = Path(__file__).resolve().parent.parent
HIVEMIND_PYTHON = REPO / "bench" / ".venv-hivemind" / "bin" / "python"
LINKS = {
    # rate, netem delay, tbf burst
    "1gbit": ("1gbit", "0.2ms", "256kb"),
    "100mbit": ("100mbit", "2ms", "64kb"),
}
NOMINAL_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4, "sign1": 1}


class BenchError(RuntimeError):
    pass


def hivemind_available() -> str | None:
    """None if the hivemind venv works, else why not."""
    if not HIVEMIND_PYTHON.exists():
        return f"{HIVEMIND_PYTHON} missing: run bench/setup_hivemind.sh"
    r = subprocess.run([str(HIVEMIND_PYTHON), "-c", "import hivemind"], capture_output=True, text=True, timeout=120)
    return None if r.returncode == 0 else f"hivemind does not import: {r.stderr.strip()[-300:]}"


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now, below the kernel's ephemeral range. A port
    the kernel hands out for a bind to port 0 is free only until it hands it out again: another
    worker's metrics server (port 0) took one before the worker meant to listen there had started,
    and that worker's peers met a plain HTTP server where they expected TLS ("knows 2 of 3 peers
    after 60 s"). Bounded: at most 1,000 tries."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    pick = random.Random()
    ports: list[int] = []
    for _ in range(1000):
        if len(ports) == n:
            return ports
        port = pick.randrange(10000, max(10001, low))
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    raise BenchError(f"found {len(ports)} of {n} free ports below {low} in 1,000 tries")


def _die_with_parent() -> None:
    """In the child: SIGKILL when the bench process dies (even by SIGKILL, where no finally runs)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Worker:
    """A worker process and a thread that turns its stdout lines into a queue."""

    def __init__(self, rank: int, argv: list[str], log_dir: str, env: dict) -> None:
        self.rank = rank
        self.log_path = os.path.join(log_dir, f"worker{rank}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, cwd=REPO, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put({"event": "eof"})

    def send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def expect(self, event: str, deadline: float) -> dict:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"worker {self.rank}: no {event!r} in time; log tail:\n{self.tail()}")
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if msg.get("event") == event:
                return msg
            if msg.get("event") in ("error", "eof"):
                raise BenchError(f"worker {self.rank}: {msg}; log tail:\n{self.tail()}")

    def tail(self, n: int = 2000) -> str:
        self._log.flush()
        try:
            return Path(self.log_path).read_text()[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        # The worker leads its own process group: kill the group, so that helper processes it
        # started (hivemind's DHT and averager) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def _tc(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["tc", *args], capture_output=True, text=True, timeout=10)


def shape_links(hosts, link: str) -> str:
    """Rate-limit (and delay, where netem exists) both directions of every host-bridge link.

    Returns a description of what was applied. netem is tried first; kernels without sch_netem
    (this machine's) get a token bucket (tbf) at the same rate and no added delay.
    """
    rate, delay, burst = LINKS[link]
    bridge = hosts[0].name.rsplit("-h", 1)[0] + "-br"  # naming of tests/integration/_netns.py
    targets = [(h.name, "eth0") for h in hosts] + [(bridge, f"vh{i}") for i in range(len(hosts))]
    kind = None
    for ns, dev in targets:
        if kind in (None, "netem"):
            r = _tc(["-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", delay, "rate", rate,
                     "limit", "100000"])
            if r.returncode == 0:
                kind = "netem"
                continue
            if kind == "netem":
                raise BenchError(f"tc netem on {ns}/{dev}: {r.stderr.strip()}")
        r = _tc(["-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                 "latency", "50ms"])
        if r.returncode != 0:
            raise BenchError(f"tc tbf on {ns}/{dev}: {r.stderr.strip()}")
        kind = "tbf"
    if kind == "netem":
        return f"netem delay {delay} rate {rate} on both directions of each link"
    return f"tbf rate {rate} burst {burst} on both directions of each link (netem unavailable: no added delay)"


def run(system: str, peers: int, params: int, codec: str, rounds: int = 5, warmup: int = 1,
        link: str | None = None, seed: int = 0, timeout_s: float = 600.0, insecure: bool = False,
        memory: bool = False) -> dict:
    """``memory`` (peer only): workers hold what a real peer holds and report peak RSS instead
    of the error against the exact mean (see ``bench.memory``)."""
    if peers < 2:
        raise BenchError("--peers must be >= 2")
    if system == "gloo" and codec != "fp32":
        raise BenchError("gloo all_reduce moves fp32; use --codec fp32")
    if system == "hivemind":
        why = hivemind_available()
        if why:
            raise BenchError(f"hivemind unavailable: {why}")
    deadline = time.monotonic() + timeout_s
    run_id = f"bench-{os.getpid()}-{int(time.time())}"
    workers: list[Worker] = []
    result: dict = {"bench": "averaging", "system": system, "peers": peers, "params": params, "codec": codec,
                    "rounds": rounds, "warmup": warmup, "link": link or "loopback", "machine": machine(),
                    "tls": system == "peer" and not insecure}
    keep = os.environ.get("BENCH_KEEP_LOGS")
    with contextlib.ExitStack() as stack, (contextlib.nullcontext(tempfile.mkdtemp(prefix="bench-avg-")) if keep
                                          else tempfile.TemporaryDirectory(prefix="bench-avg-")) as log_dir:
        result["log_dir"] = log_dir if keep else None
        if link:
            sys.path.insert(0, str(REPO / "tests" / "integration"))
            from _netns import NetnsUnavailable, bridged_namespaces

            try:
                hosts = stack.enter_context(bridged_namespaces(peers, "bavg", subnet="10.78.0.0/24"))
            except NetnsUnavailable as exc:
                raise BenchError(f"netns unavailable: {exc}") from exc
            result["link_emulation"] = shape_links(hosts, link)
            ips = [h.ip for h in hosts]
            ports = [7070] * peers
            iface = "eth0"
        else:
            hosts = None
            ips = ["127.0.0.1"] * peers
            ports = _free_ports(peers)
            iface = None
        addresses = [f"{ip}:{port}" for ip, port in zip(ips, ports)]
        result["addresses"] = addresses
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")
        if system == "gloo":
            env["GLOO_SOCKET_IFNAME"] = iface or "lo"
        credentials = throwaway_credentials(run_id) if result["tls"] else None

        def argv(rank: int, extra: list[str]) -> list[str]:
            common = ["--rank", str(rank), "--peers", str(peers), "--params", str(params), "--codec", codec,
                      "--seed", str(seed), "--host", ips[rank], "--run-id", run_id]
            if iface:
                common += ["--iface", iface]
            if result["tls"]:
                common += ["--credentials", credentials]
            if memory:
                common += ["--memory"]
            if system == "hivemind":
                cmd = [str(HIVEMIND_PYTHON), "-m", "bench._hm_worker", *common, *extra]
            else:
                cmd = [sys.executable, "-m", "bench._avg_worker", "--system", system,
                       "--addresses", json.dumps(addresses), *common, *extra]
            return hosts[rank].exec_argv(cmd) if hosts else cmd

        try:
            if system == "hivemind":
                workers.append(Worker(0, argv(0, []), log_dir, dict(env, BENCH_RANK="0")))
                maddrs = workers[0].expect("ready", min(deadline, time.monotonic() + 120))["maddrs"]
                for rank in range(1, peers):
                    workers.append(Worker(rank, argv(rank, ["--initial-peers", json.dumps(maddrs)]), log_dir,
                                          dict(env, BENCH_RANK=str(rank))))
                for w in workers[1:]:
                    w.expect("ready", min(deadline, time.monotonic() + 120))
            else:
                for rank in range(peers):
                    workers.append(Worker(rank, argv(rank, []), log_dir, dict(env, BENCH_RANK=str(rank))))
                ready = [w.expect("ready", min(deadline, time.monotonic() + 120)) for w in workers]
            per_round = []
            for r in range(warmup + rounds):
                for w in workers:
                    w.send(f"prepare {r}")
                for w in workers:
                    w.expect("prepare", deadline)
                for w in workers:
                    w.send(f"round {r}")
                msgs = [w.expect("round", deadline) for w in workers]
                if r >= warmup:
                    per_round.append(msgs)
            for w in workers:
                w.send("stop")
            for w in workers:
                with contextlib.suppress(BenchError):
                    w.expect("done", min(deadline, time.monotonic() + 15))
        finally:
            for w in workers:
                w.kill()
    result.update(_aggregate(system, peers, params, codec, per_round))
    if memory and system == "peer":
        result["ready_peak_rss_bytes"] = max(r.get("peak_rss_bytes", 0) for r in ready)
        result["peak_rss_bytes"] = max(m["peak_rss_bytes"] for msgs in per_round for m in msgs)
        for where in ("round", "snapshot"):
            result[f"{where}_peak_rss_bytes"] = max(m[f"{where}_peak_rss_bytes"] for msgs in per_round for m in msgs)
    return result


def _aggregate(system: str, k: int, n: int, codec: str, per_round: list[list[dict]]) -> dict:
    failed = sum(1 for msgs in per_round for m in msgs if not m.get("ok"))
    secs = [max(m["seconds"] for m in msgs) for msgs in per_round]
    out = summary(secs)
    out["rounds_failed"] = failed
    errs = [m["max_abs_err"] for msgs in per_round for m in msgs if m.get("max_abs_err") is not None]
    out["max_abs_err"] = max(errs) if errs else None
    bounds = [m["err_bound"] for msgs in per_round for m in msgs if m.get("err_bound") is not None]
    out["err_bound"] = min(bounds) if bounds else None
    sent = [m["bytes_sent"] for msgs in per_round for m in msgs if m.get("bytes_sent") is not None]
    wire = [m["wire_tx_bytes"] for msgs in per_round for m in msgs if m.get("wire_tx_bytes") is not None]
    bits = NOMINAL_BITS.get(codec, 32)
    expected = 2 * (k - 1) / k * n * bits / 8
    out["expected_bytes"] = expected
    out["bytes_sent_per_peer"] = statistics.mean(sent) if sent else None
    out["bytes_source"] = "daemon payload counters" if sent else "not measured (expected_bytes is theory)"
    out["bytes_ratio"] = out["bytes_sent_per_peer"] / expected if sent else None
    out["wire_tx_bytes_per_peer"] = statistics.mean(wire) if wire else None
    out["wire_ratio"] = out["wire_tx_bytes_per_peer"] / expected if wire else None
    if system == "peer":
        from peer.codec import get_codec

        out["expected_payload_bytes"] = 2 * (k - 1) / k * get_codec(codec).encoded_size(n)
        for phase in PHASES:
            out[f"{phase}_median_s"] = statistics.median(max(m[f"{phase}_s"] for m in msgs) for msgs in per_round)
    cpu = [statistics.mean(m["cpu_s"] for m in msgs) for msgs in per_round if all("cpu_s" in m for m in msgs)]
    out["cpu_s_per_peer_median"] = statistics.median(cpu) if cpu else None
    out["per_round_s"] = secs
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=["peer", "gloo", "hivemind"], required=True)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--params", type=int, default=10_000_000)
    p.add_argument("--codec", default="int8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--link", choices=sorted(LINKS), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="whole-run limit in seconds")
    p.add_argument("--insecure", action="store_true", help="peer without TLS (default: mutual TLS, as users run)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        res = run(args.system, args.peers, args.params, args.codec, args.rounds, args.warmup, args.link,
                  args.seed, args.timeout, args.insecure)
    except BenchError as exc:
        if args.json:
            emit_json({"bench": "averaging", "system": args.system, "error": str(exc)})
        else:
            print(f"averaging bench failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        emit_json(res)
        return 0
    print(f"averaging: {args.system}{' (TLS)' if res['tls'] else ''}, K={args.peers}, N={args.params:,}, codec {args.codec}, "
          f"{res['link']}{' (' + res['link_emulation'] + ')' if 'link_emulation' in res else ''}; {res['machine']}")
    # Four decimals: a small model's round is a few milliseconds.
    print(f"  round s: median {res['median_s']:.4f}  min {res['min_s']:.4f}  max {res['max_s']:.4f}  "
          f"over {args.rounds} rounds after {args.warmup} warm-up; failed {res['rounds_failed']}")
    if res.get("cpu_s_per_peer_median") is not None:
        print(f"  CPU s per peer per round (user+sys, all threads; mean over peers, median over rounds): "
              f"{res['cpu_s_per_peer_median']:.4f}")
    if system_phases := [k for k in PHASES if f"{k}_median_s" in res]:
        print("  phases (median s): " + ", ".join(f"{k} {res[k + '_median_s']:.4f}" for k in system_phases))
    if res["bytes_sent_per_peer"] is not None:
        print(f"  bytes sent per peer per round: {res['bytes_sent_per_peer']:,.0f} "
              f"({res['bytes_ratio']:.3f}x of 2(K-1)/K*N*bits/8 = {res['expected_bytes']:,.0f})")
    else:
        print(f"  bytes sent per peer per round: not measured on loopback; theory {res['expected_bytes']:,.0f}")
    if res["wire_tx_bytes_per_peer"] is not None:
        print(f"  wire bytes (eth0 tx, incl. TCP/IP and gRPC framing): {res['wire_tx_bytes_per_peer']:,.0f} "
              f"({res['wire_ratio']:.3f}x)")
    print(f"  max abs error vs exact mean: {res['max_abs_err']:.3e}"
          + (f" (bound {res['err_bound']:.3e})" if res["err_bound"] is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
