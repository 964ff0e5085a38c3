"""Bounded chaos: for a fixed time, randomly start and kill -9 peers (3 to 6 alive) on 127.0.0.1.

Rounds keep completing, no peer hangs, no NaN appears, members of every group that completed a
round hold the same parameters, and once the chaos stops all live peers converge to one state.
The schedule comes from a seeded RNG (PEER_CHAOS_SEED) so a failure can be replayed; its length
is PEER_CHAOS_S seconds (default 45: about eight kills and starts; longer runs, e.g.
PEER_CHAOS_S=600, are for hunting rare interleavings by hand).
"""

from __future__ import annotations

import os
import random
import re
import signal
import time

from tests.fault.test_faults import _done_times
from tests.integration._peers import Swarm, check_invariant, consistent_rounds, wait_until

CHAOS_S = float(os.environ.get("PEER_CHAOS_S", "45"))
SEED = int(os.environ.get("PEER_CHAOS_SEED", "1234"))


def test_random_kills_and_starts_never_stop_the_run(tmp_path):
    rng = random.Random(SEED)
    with Swarm(tmp_path, f"chaos-{os.getpid()}", ["--rounds", "0", "--checkpoint-interval-s", "1"]) as swarm:
        counter = 0

        def start(state: str | None = None):
            nonlocal counter
            counter += 1
            name = state or f"c{counter}"
            return swarm.start(name if state is None else f"{state}-r{counter}", "--state-dir", str(tmp_path / name),
                               wait=False)

        alive = [start() for _ in range(4)]
        for p in alive:
            p.wait_listening(60)
        wait_until(lambda: len(consistent_rounds(alive)) >= 2, 60, "the first rounds together")

        # Execute: the chaos
        events = []
        t_end = time.monotonic() + CHAOS_S
        while time.monotonic() < t_end:
            time.sleep(rng.uniform(3, 7))
            alive = [p for p in alive if p.alive()]
            if len(alive) > 3 and (len(alive) >= 6 or rng.random() < 0.5):
                victim = rng.choice(alive)
                os.killpg(victim.proc.pid, signal.SIGKILL)
                victim.proc.wait(10)
                events.append((time.time(), f"kill -9 {victim.name}"))
                alive.remove(victim)
            else:
                # Half of the starts restart a killed peer from its state dir (checkpoint).
                dead = [p for p in swarm.peers if not p.alive()]
                if dead and rng.random() < 0.5:
                    old = rng.choice(dead)
                    p = start(old.name.split("-r")[0])
                else:
                    p = start()
                p.wait_listening(60)
                events.append((time.time(), f"start {p.name}"))
                alive.append(p)
        chaos_over = time.time()

        # Assert 1: rounds kept completing during the chaos (no 20 s window without a round)
        done = sorted(t for p in swarm.peers for t, _, _ in _done_times(p.log()))
        starts = events[0][0] - 1 if events else chaos_over - CHAOS_S
        gaps = [b - a for a, b in zip([starts, *[t for t in done if t >= starts]],
                                      [*[t for t in done if t >= starts], chaos_over])]
        assert max(gaps) < 20, f"a {max(gaps):.1f} s gap without a completed round; events: {events}"

        # Assert 2: no peer hangs: every live peer answers and converges with the others
        alive = [p for p in swarm.peers if p.alive()]
        assert 3 <= len(alive) <= 6
        wait_until(lambda: any(r for r in consistent_rounds(alive)
                               if all(t > chaos_over for t, rr, _ in _done_times(alive[0].log()) if rr == r)),
                   60, "all live peers to complete a round together after the chaos",
                   lambda: "\n".join(p.tail(15) for p in alive) + f"\nevents: {events}")
        statuses = [p.status() for p in alive]

        # Assert 3: no NaN, and the core invariant over every log, the killed peers' included
        for s in statuses:
            assert s["loss"] is not None and s["loss"] == s["loss"], s
        for p in swarm.peers:
            assert not re.search(r"\bnan\b", p.log(), re.I), p.name
        groups = check_invariant(swarm.peers)
        assert groups > 10
        print(f"\nCHAOS {len(events)} events in {CHAOS_S:.0f} s, {groups} multi-peer groups checked, "
              f"largest gap between completed rounds {max(gaps):.2f} s")
