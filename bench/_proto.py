"""The line protocol between ``bench.averaging`` and its worker processes (stdlib only).

Parent -> worker (stdin): ``prepare R`` (build round R's inputs; answered ``{"event": "prepare"}``),
``round R`` (run round R now), ``stop``. The parent sends ``round R`` only once every worker has
answered ``prepare R``, so no worker builds inputs while another is still in a timed round.
Worker -> parent (stdout, one JSON object a line): ``{"event": "ready", ...}`` once set up,
``{"event": "round", "r": R, ...}`` after each round, ``{"event": "done"}`` before exiting,
``{"event": "error", "message": ...}`` on failure. Logs go to stderr, never stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback


def say(**obj) -> None:
    sys.stdout.write(json.dumps(obj, default=float) + "\n")
    sys.stdout.flush()


async def serve(setup, do_round, teardown, commands=None, prepare=None) -> int:
    """Run the worker side: ``await setup()`` -> dict, ``await prepare(r)`` (optional),
    ``await do_round(r)`` -> dict, ``await teardown()``.

    ``commands`` maps other command words to ``async f(arg: str) -> dict``, answered as
    ``{"event": <word>, ...}``.
    """
    loop = asyncio.get_running_loop()
    status = 0
    try:
        info = await setup()
        say(event="ready", **(info or {}))
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == "stop":
                break
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "prepare":
                if prepare is not None:
                    await prepare(int(arg))
                say(event="prepare", r=int(arg))
            elif cmd == "round":
                say(event="round", r=int(arg), **(await do_round(int(arg))))
            elif commands and cmd in commands:
                say(event=cmd, **(await commands[cmd](arg)))
            else:
                raise ValueError(f"unknown command {line.strip()!r}")
    except Exception as exc:  # report, then exit non-zero; the parent kills the others
        traceback.print_exc()
        say(event="error", message=f"{type(exc).__name__}: {exc}")
        status = 1
    finally:
        try:
            await teardown()
        except Exception:
            traceback.print_exc()
    say(event="done")
    return status
