"""`peer demo`: local peers on 127.0.0.1 training one model together, against one peer alone.

It starts ``--peers`` ``peer run`` processes of one run (mDNS on loopback), each told to stop by
itself after ``--rounds`` completed rounds (``peer run --rounds``), and one more process that
trains alone. Every peer writes its address to ``endpoint.json`` in its state dir
(``peer.endpoint``); the demo polls every peer's status over gRPC, prints one row per peer every
2 s (round, phase, loss, eval loss and accuracy, peers, bytes sent, global hash), waits for the
peers to stop, and ends with a summary:

- final eval loss and accuracy of the peers together against the peer alone, same training time;
- the bytes each peer sent against what data-parallel training would have sent for the same
  inner steps: a ring all-reduce of fp32 gradients after every step, 2(K-1)/K x 4 x N bytes per
  step and peer for K peers and N parameters;
- whether every peer holds the same global parameters (their global hash).

Exit status: 0 when every peer completed the rounds and they hold the same parameters, 1 on any
failure (one line on stderr says which), 2 for bad arguments, 130 on Ctrl-C. Never raises
SystemExit: ``peer.cli`` is the only module that exits.

The baseline ("one peer alone for the same time") is a ``peer run`` with the same task and
settings under another run id (``<run id>-alone``) with mDNS off, so it never meets the others:
each of its rounds is a group of one (the same outer step, nothing averaged). It runs
concurrently with the others, which is the fair comparison on one machine: every process has
one torch thread and the kernel shares the cores among them, so the lone peer gets (at least)
the CPU share of one swarm peer. "The same time" is training time, counted for each side from
its own start of training (the first status answer past start-up): the swarm's from its first
peer's start to the moment all of them completed their rounds; the lone peer, which has nobody
to discover or wait for, usually starts earlier, and the demo compares its status after that
same training time (status answers are polled every 0.2 s and kept), then stops it. It still
gets more rounds done in that time than the swarm peers (no waiting for the group, nothing to
send), so the comparison favours it.

Defaults (``peer/cli.py``): 3 peers, task ``fashion`` (Fashion-MNIST MLP, 203,530 parameters),
30 rounds of H=50 inner steps, inner lr 5e-4 (half the task's default), codec int8. The former
default, digits, overfits its 1,500 training samples: with H=40 its eval loss fell to 0.52 by
round 5 and rose to 0.97 by round 30. Eval loss at rounds 5/10/15/20/25/30 of the peers
together, measured on the shared 2-core machine (load 5-7), and the lone peer's: the first two
rows by ``peer demo`` (the lone peer at the same training time), the last two by the same
3 + 1 ``peer run`` started by hand (the lone peer's last value when the others exited):

    together: 0.501 0.422 0.386 0.366 0.356 0.352  (acc 87.7 %)   alone: 0.368 (acc 87.0 %)
    together: 0.485 0.420 0.388 0.365 0.356 0.342  (acc 88.1 %)   alone: 0.369 (acc 87.4 %)
    together: 0.476 0.419 0.386 0.363 0.349 0.340                 alone: 0.367
    together: 0.490 0.421 0.386 0.373 0.361 0.345                 alone: 0.359

The lone peer's eval loss moves by up to +-0.02 from one round to the next (0.369, 0.347, 0.341
in the three rounds after the second row's comparison point); the averaged model's moves far
less, so the margin of one run is partly chance; in each of the five runs measured (one more
with the lone peer read at the same wall time: 0.344 against 0.368) the peers together ended
lower.

With the task's own inner lr 1e-3 the curve flattens after round ~20 (H=30: 0.356 0.355 0.353
0.350 0.354 at rounds 30 to 50); the lower rate keeps it improving to the last round. Training
takes 20-35 s (idle to busy machine), start-up 5-30 s more (importing torch in 4 processes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from peer.client import StatusClient, human_bytes
from peer.endpoint import read_endpoint

DISPLAY_EVERY_S = 2.0
# Status polls of every running peer; faster while a peer is in its last round, because a peer
# answers for only ~0.3-0.6 s between its last round and its exit.
POLL_S = 0.2
POLL_LAST_ROUND_S = 0.1
START_TIMEOUT_S = 120.0  # until every peer wrote its endpoint file
STOP_WAIT_S = 15.0

# Lines of the daemon's log read for the summary: the parameter count, and per completed round
# its eval loss and global hash prefix. They are a record that cannot be missed, unlike the
# last status answer before a peer exits.
PARAMS_RE = re.compile(r" listening on .*\((\d+) parameters[,)]")
COMPLETED_RE = re.compile(r"completed (\d+) rounds; stopping")
ROUND_RE = re.compile(r"round (\d+) done: \d+ peers, \S+, loss \S+, eval (\S+), .*global ([0-9a-f]+)")


class _Failed(Exception):
    """The demo cannot go on; the message is the one line for stderr."""


@dataclass
class _Peer:
    name: str
    proc: subprocess.Popen
    state_dir: Path
    log_path: Path
    address: str = ""  # from its endpoint file
    last: dict | None = None  # the newest status answer
    exit_code: int | None = None
    training_since: float | None = None  # monotonic time of the first answer past start-up

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def last_line(self) -> str:
        lines = [ln.strip() for ln in self.log().splitlines() if ln.strip()]
        return lines[-1] if lines else "no output"

    def running(self) -> bool:
        if self.exit_code is None:
            self.exit_code = self.proc.poll()
        return self.exit_code is None


@dataclass
class _Final:
    """What one swarm peer's log says about its run."""

    rounds: int = 0
    eval_loss: str = "nan"
    global_hash: str = ""


@dataclass
class _Demo:
    args: argparse.Namespace
    run_id: str
    root: Path
    peers: list[_Peer] = field(default_factory=list)  # the swarm, then the lone peer
    started: float = 0.0
    problems: list[str] = field(default_factory=list)
    alone_history: list[tuple[float, dict]] = field(default_factory=list)
    alone_final: dict | None = None  # the lone peer's status after as much training as the swarm's

    @property
    def swarm(self) -> list[_Peer]:
        return self.peers[:-1]

    @property
    def alone(self) -> _Peer:
        return self.peers[-1]


def run_demo(args: argparse.Namespace) -> int:
    problem = _check_args(args)
    if problem:
        return _fail(problem, 2)
    run_id = args.run_id or f"demo-{os.getpid()}"
    try:
        if args.state_dir:
            root = Path(args.state_dir)
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(tempfile.mkdtemp(prefix="peer-demo-"))
    except OSError as exc:
        return _fail(f"cannot create the state directory: {exc}")
    demo = _Demo(args, run_id, root)
    try:
        return asyncio.run(_main(demo))
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the peers", flush=True)
        return 130
    finally:
        _stop(demo.peers)


def _check_args(args: argparse.Namespace) -> str:
    if not 2 <= args.peers <= 16:
        return "--peers must be between 2 and 16"
    if args.rounds < 1:
        return "--rounds must be at least 1"
    if args.inner_steps < 1:
        return "--inner-steps must be at least 1"
    if not args.inner_lr > 0:
        return "--inner-lr must be positive"
    if args.base_port and not 1024 <= args.base_port <= 65535 - args.peers:
        return f"--base-port must be between 1024 and {65535 - args.peers}"
    return ""


def _fail(message: str, code: int = 1) -> int:
    print(f"peer demo: {message}", file=sys.stderr, flush=True)
    return code


async def _main(demo: _Demo) -> int:
    a = demo.args
    print(f"starting {a.peers} peers training {a.task} together for {a.rounds} rounds of {a.inner_steps} "
          f"inner steps (codec {a.codec}), and 1 peer training alone for comparison; logs and state in "
          f"{demo.root}", flush=True)
    try:
        _make_credentials(demo)
        _start(demo)
        async with StatusClient(credentials=str(_credentials_dir(demo, False))) as together, \
                StatusClient(credentials=str(_credentials_dir(demo, True))) as alone:
            duration = await _watch(demo, together, alone)
    except OSError as exc:
        return _fail(f"cannot start the peers: {exc}")
    except _Failed as exc:
        return _fail(str(exc))
    _display(demo, time.monotonic() - demo.started)
    return _summary(demo, duration)


def _peer_argv(demo: _Demo, i: int, alone: bool) -> list[str]:
    a = demo.args
    port = a.base_port + i if a.base_port else 0
    argv = [sys.executable, "-m", "peer", "run", "--task", a.task, "--codec", a.codec,
            "--inner-steps", str(a.inner_steps), "--inner-lr", repr(a.inner_lr), "--eval-every-rounds", "1",
            "--listen", f"127.0.0.1:{port}", "--metrics-port", "0", "--threads", "1",
            "--state-dir", str(demo.root / ("alone" if alone else f"peer{i}"))]
    if a.data:
        argv += ["--data", a.data]
    # Secure as a real run: throwaway run credentials in the demo's directory (one run CA for
    # the swarm, one for the lone peer's own run).
    argv += ["--credentials", str(_credentials_dir(demo, alone))]
    if alone:
        # Nobody to wait for at start-up (the others wait for each other up to 1.5 s): no grace.
        return argv + ["--run-id", f"{demo.run_id}-alone", "--mdns", "off", "--rounds", "0", "--startup-grace-s", "0"]
    return argv + ["--run-id", demo.run_id, "--interface", "127.0.0.1", "--rounds", str(a.rounds)]


def _credentials_dir(demo: _Demo, alone: bool) -> Path:
    return demo.root / ("credentials-alone" if alone else "credentials")


def _make_credentials(demo: _Demo) -> None:
    """Create the two runs' credentials (or keep those a reused --state-dir already holds)."""
    from peer.credentials import create_run_credentials, load_run_ca
    from peer.errors import ConfigError

    for alone, run_id in ((False, demo.run_id), (True, f"{demo.run_id}-alone")):
        path = _credentials_dir(demo, alone)
        try:
            load_run_ca(path, run_id)
        except ConfigError:
            if path.exists():
                shutil.rmtree(path)
            create_run_credentials(run_id, path)


def _start(demo: _Demo) -> None:
    demo.started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for i in range(demo.args.peers + 1):
        alone = i == demo.args.peers
        name = "alone" if alone else f"peer{i}"
        state = demo.root / name
        state.mkdir(parents=True, exist_ok=True)
        log_path = demo.root / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(_peer_argv(demo, i, alone), stdout=log, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL)
        demo.peers.append(_Peer(name, proc, state, log_path))


def _find_endpoints(demo: _Demo) -> bool:
    """Read the endpoint file of every peer not yet listening; True once all are. Raises
    _Failed for a peer that exited before listening or did not listen in time."""
    for p in demo.peers:
        if p.address:
            continue
        ep = read_endpoint(p.state_dir, pid=p.proc.pid)  # a file of an earlier run does not count
        if ep is not None:
            p.address = ep.grpc
        elif not p.running():
            raise _Failed(f"{p.name} exited with {p.exit_code} before listening ({p.last_line()}); see {p.log_path}")
        elif time.monotonic() - demo.started > START_TIMEOUT_S:
            raise _Failed(f"{p.name} did not listen within {START_TIMEOUT_S:.0f} s; see {p.log_path}")
    return all(p.address for p in demo.peers)


async def _poll(clients: tuple[StatusClient, StatusClient], demo: _Demo, peers: list[_Peer],
                timeout_s: float = 1.0) -> None:
    async def one(p: _Peer) -> None:
        client = clients[1] if p is demo.alone else clients[0]
        try:
            p.last = await client.status(p.address, timeout_s)
        except Exception:  # noqa: BLE001 (busy or stopping: keep its last answer, keep watching)
            pass

    await asyncio.gather(*(one(p) for p in peers if p.address and p.running()))


async def _watch(demo: _Demo, together: StatusClient, alone_client: StatusClient) -> float:
    """Poll the peers and show a table every 2 s until every swarm peer exited and the lone peer
    trained as long as the swarm did. Return the swarm's training time: from its first peer's
    start of training (past start-up: discovery, waiting for the others) until all completed."""
    rounds, alone = demo.args.rounds, demo.alone
    listening = False
    next_display = time.monotonic()
    duration: float | None = None
    while any(p.running() for p in demo.swarm) or demo.alone_final is None:
        if not listening and _find_endpoints(demo):
            listening = True
            print("listening: " + ", ".join(f"{p.name} {p.address}" for p in demo.peers), flush=True)
        await _poll((together, alone_client), demo,
                    [p for p in demo.peers if p is not alone or demo.alone_final is None])
        now = time.monotonic()
        for p in demo.peers:
            if p.training_since is None and p.last and (p.last["phase"] != "starting" or p.last["rounds_completed"]):
                p.training_since = now
        if alone.last is not None and demo.alone_final is None:
            demo.alone_history.append((now, alone.last))
        if listening and duration is None and all(_finished(p, rounds) for p in demo.swarm):
            starts = [p.training_since for p in demo.swarm if p.training_since is not None]
            duration = now - min(starts, default=now)
        if duration is not None and demo.alone_final is None:
            _maybe_stop_alone(demo, duration, now)
        if listening and now >= next_display:
            _display(demo, now - demo.started)
            next_display = now + DISPLAY_EVERY_S
        last_round = any(p.last and p.last["rounds_completed"] >= rounds - 1 for p in demo.swarm if p.running())
        await asyncio.sleep(POLL_LAST_ROUND_S if last_round else POLL_S)
    return duration if duration is not None else 0.0


def _finished(p: _Peer, rounds: int) -> bool:
    """Whether a swarm peer is done training: exited, or completed ``rounds`` (its status, or its
    log when the status answer was missed)."""
    if not p.running() or (p.last and p.last["rounds_completed"] >= rounds):
        return True
    if p.last and p.last["rounds_completed"] < rounds - 1:
        return False
    return any(int(m[1]) >= rounds for m in COMPLETED_RE.finditer(p.log()))


def _maybe_stop_alone(demo: _Demo, duration: float, now: float) -> None:
    """Once the lone peer trained for ``duration`` from its own start of training, keep its
    status from that moment and stop it (it usually started earlier: nobody to wait for)."""
    alone = demo.alone
    since = alone.training_since
    if not alone.running():
        demo.problems.append(f"the peer training alone exited early with {alone.exit_code} "
                             f"({alone.last_line()}); see {alone.log_path}")
        demo.alone_final = {}
        return
    if since is None:
        if now - demo.started < START_TIMEOUT_S + duration:
            return  # still starting up: give it its time
        demo.problems.append(f"the peer training alone never started training; see {alone.log_path}")
        demo.alone_final = {}
    elif now >= since + duration:
        demo.alone_final = next((s for t, s in reversed(demo.alone_history) if t <= since + duration), {})
        if demo.alone_final:
            alone.last = demo.alone_final  # the table shows what the summary compares
    else:
        return
    with contextlib.suppress(OSError):
        alone.proc.send_signal(signal.SIGTERM)


def _display(demo: _Demo, elapsed: float) -> None:
    rows = [f"{elapsed:5.0f} s"]
    for p in demo.peers:
        rows.append(_row(p, demo.args.rounds, show_total=p is not demo.alone))
    print("\n".join(rows), flush=True)


def _row(p: _Peer, rounds: int, show_total: bool) -> str:
    s = p.last
    if s is None:
        state = "starting" if p.running() else f"exited ({p.exit_code})"
        return f"  {p.name:<6} {state}"
    num = lambda x: "    - " if x is None else f"{x:6.3f}"  # noqa: E731
    acc = "   - " if s["eval_accuracy"] is None else f"{100 * s['eval_accuracy']:4.1f}%"
    total = f"/{rounds}" if show_total else ""
    done = f"{s['rounds_completed']:3d}{total:<{1 + len(str(rounds))}}"
    phase = s["phase"] if p.running() else ("stopped" if p.exit_code == 0 else f"exit {p.exit_code}")
    return (f"  {p.name:<6} rounds {done}  {phase:<11} loss {num(s['loss'])}  eval loss {num(s['eval_loss'])}  "
            f"acc {acc}  peers {len(s['peers'])}  sent {human_bytes(s['bytes_sent']):>9}  "
            f"global {s['global_hash'][:12]}")


def _final(p: _Peer) -> _Final:
    f = _Final()
    for m in ROUND_RE.finditer(p.log()):
        f.rounds += 1
        f.eval_loss, f.global_hash = m[2], m[3]
    return f


def _summary(demo: _Demo, elapsed: float) -> int:
    a, k = demo.args, len(demo.swarm)
    finals = {p.name: _final(p) for p in demo.swarm}
    problems = demo.problems + [f"{p.name} exited with {p.exit_code} ({p.last_line()}); see {p.log_path}"
                for p in demo.swarm if p.exit_code != 0]
    problems += [f"{p.name} completed {finals[p.name].rounds} rounds, not {a.rounds}; see {p.log_path}"
                 for p in demo.swarm if p.exit_code == 0 and finals[p.name].rounds != a.rounds]
    hashes = {f.global_hash for f in finals.values()}
    same = len(hashes) == 1 and "" not in hashes
    first = finals[demo.swarm[0].name]
    accuracy = _together_accuracy(demo.swarm, first) if same else "-"
    together_loss = _float(first.eval_loss) if same else None
    alone = demo.alone_final or None
    alone_loss = alone["eval_loss"] if alone else None

    print(f"\nSummary: {k} peers trained {a.task} together, {a.rounds} rounds of {a.inner_steps} steps each, "
          f"in {_secs(elapsed)} of training", flush=True)
    if together_loss is None:
        print("  together:  - (the peers do not hold the same model)")
    else:
        print(f"  together:  eval loss {together_loss:.3f}, accuracy {accuracy}  (held-out data; lower loss is better)")
    if alone is None:
        if not demo.problems:
            problems.append(f"the peer training alone never answered; see {demo.alone.log_path}")
        print("  alone:     - (no answer)")
    else:
        print(f"  alone:     eval loss {_num(alone_loss)}, accuracy {_pct(alone['eval_accuracy'])}  (one peer training "
              f"alone for the same {_secs(elapsed)}: {alone['rounds_completed']} rounds)")
        if together_loss is not None and alone_loss:
            change = (together_loss - alone_loss) / alone_loss
            print(f"             together reached a {abs(change):.0%} {'lower' if change <= 0 else 'HIGHER'} eval "
                  f"loss than alone")
    _bytes_lines(demo, _params(demo.swarm[0].log()))
    if same:
        print(f"  same model on every peer: yes (all {k} hold global hash {first.global_hash}...)", flush=True)
    else:
        listing = ", ".join(f"{name} {f.global_hash or '-'}" for name, f in finals.items())
        print(f"  same model on every peer: NO ({listing})", flush=True)
        problems.append("the peers do not hold the same global parameters")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return _fail(problems[0] + more)
    return 0


def _bytes_lines(demo: _Demo, numel: int) -> None:
    """Bytes each peer sent (its status: parts sent as a member plus averages answered as a
    shard owner) against data-parallel training for the same steps."""
    a, k = demo.args, len(demo.swarm)
    answers = [p.last for p in demo.swarm if p.last]
    if not answers:
        print("  bytes:     - (no peer answered)")
        return
    done = max(s["rounds_completed"] for s in answers)
    sent = max(s["bytes_sent"] for s in answers if s["rounds_completed"] == done)
    when = "" if done >= a.rounds else f" in its first {done} rounds (its last answer)"
    print(f"  bytes:     each peer sent {human_bytes(sent)}{when} ({a.codec} model deltas, once a round)")
    steps = done * a.inner_steps
    if numel and sent:
        ddp = steps * 2 * (k - 1) / k * 4 * numel
        print(f"             data-parallel training would have sent {human_bytes(ddp)} for the same {steps} steps "
              f"(fp32 gradients of {numel:,} parameters, all-reduced after every step): {ddp / sent:.0f}x more")


def _together_accuracy(swarm: list[_Peer], final: _Final) -> str:
    """The swarm's final eval accuracy (the log line of a round has none): every peer evaluates
    the same parameters, so any peer's status answer that shows the final global hash and eval
    loss has it. Status answers are brief after the last round; when none was caught, the newest
    answer's accuracy, labelled with its round."""
    answers = [p.last for p in swarm if p.last and p.last["eval_accuracy"] is not None]
    for s in answers:
        if (s["global_hash"].startswith(final.global_hash) and s["eval_loss"] is not None
                and f"{s['eval_loss']:.4f}" == final.eval_loss):
            return _pct(s["eval_accuracy"])
    if not answers:
        return "-"
    newest = max(answers, key=lambda s: s["rounds_completed"])
    return f"{_pct(newest['eval_accuracy'])} (after round {newest['rounds_completed']})"


def _params(log: str) -> int:
    m = PARAMS_RE.search(log)
    return int(m[1]) if m else 0


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _secs(x: float) -> str:
    return f"{x:.1f} s" if x < 10 else f"{x:.0f} s"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _stop(peers: list[_Peer]) -> None:
    """SIGTERM every peer still running, wait for them (bounded), kill what is left."""
    for p in peers:
        if p.proc.poll() is None:
            with contextlib.suppress(OSError):
                p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    for p in peers:
        try:
            p.exit_code = p.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.exit_code = p.proc.wait()
