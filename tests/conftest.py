"""Suite-wide guards: no test may block an asyncio event loop, and no test may leak a thread.

Blocked loop
    Every callback an asyncio event loop runs (a task step, a future callback, a reader or timer
    callback) goes through ``asyncio.Handle._run``; the guard wraps it and times each call, on every
    asyncio loop in this process: pytest-asyncio's loops (async tests and async fixtures) and the
    loops of ``asyncio.run`` in sync tests and helpers. While a callback is still running past half
    the threshold, a watchdog thread samples the loop thread's stack, so the report names the line
    that blocks (``time.sleep``, a lock, a CPU-bound call), not where the task sat afterwards. A block
    during a test's setup or call FAILS the test with that report; a block during teardown is an
    error at teardown.
    Why not asyncio debug mode (``slow_callback_duration``): it captures a stack on every
    ``call_soon`` (slowing the very code it times), it only logs where the task is *after* the slow
    step, and it changes behaviour (its thread-safety checks raise). uvloop's handles are Cython and
    are not timed; no test runs on uvloop (only ``peer.cli`` picks it for the real daemon).

Leaked threads
    A thread alive after teardown that was not alive before setup is a leak: the test errors at
    teardown, after a bounded grace period for threads on their way out and after a garbage
    collection (an object in a reference cycle can keep a thread alive until it is collected:
    grpc.aio's poller thread runs while any grpc.aio channel, server or call object exists).
    Threads started while a wider-scoped (module/session) fixture is set up belong to that fixture
    until it is finalized. The report names each thread, where it was started (``Thread.start`` is
    wrapped to record the stack) and what it is doing now. Library threads that may outlive a test
    by design are listed in ``ALLOWED_THREADS`` with the reason.

A test that already failed gets the guard's findings about its teardown as a warning instead of a
second error (a failing test often skips its own cleanup).
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import pytest

# One callback running at least this long is a blocked loop. 0.5 s: it catches a time.sleep(0.5+)
# or a blocking socket/subprocess/file call on the loop, and leaves a wide margin above what the
# suite's loops really do: on the 2-core dev machine no callback in tests/unit,
# tests/fault/test_hostile.py or tests/integration/test_discovery_mdns.py took even 10 ms, and
# none took 50 ms with three CPU-burning processes competing for the two cores. A callback's wall
# time also counts waiting for the GIL and for a CPU, and any garbage-collection pause it triggers:
# hence the margin; raise it on a badly overloaded machine.
LOOP_BLOCK_S = float(os.environ.get("PEER_TEST_LOOP_BLOCK_S", "0.5"))
# How long a test's new threads may take to finish after teardown before they count as leaked.
THREAD_GRACE_S = float(os.environ.get("PEER_TEST_THREAD_GRACE_S", "2.0"))

# Threads allowed to outlive a test: name regex -> why. Empty on purpose: every thread the suite
# starts today (grpc.aio's poller, executor workers, subprocess output readers) ends when the
# object that owns it is closed or collected. Add a pattern only for a thread that is process-wide by
# design (created once, reused, owned by a library), never for one the code under test should stop.
ALLOWED_THREADS: dict[str, str] = {}

# ---------------------------------------------------------------------------------------------
# Blocked-loop detection
# ---------------------------------------------------------------------------------------------


@dataclass
class _Running:
    started: float
    samples: list[str] = field(default_factory=list)  # distinct stacks seen while it ran


@dataclass
class _Block:
    seconds: float
    what: str
    thread: str
    samples: list[str]


_running: dict[int, _Running] = {}  # thread id -> the callback that thread's loop runs now
_blocks: list[_Block] = []  # blocks seen since the current test phase began
_orig_handle_run = asyncio.events.Handle._run


def _describe(handle: asyncio.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):  # a task step or wakeup: name the coroutine
        coro = task.get_coro()
        code = getattr(coro, "cr_code", None)
        where = f" defined at {code.co_filename}:{code.co_firstlineno}" if code else ""
        return f"a step of task {task.get_name()!r} running {getattr(coro, '__qualname__', coro)!r}{where}"
    try:
        return f"callback {handle!r}"
    except Exception:  # pragma: no cover (a broken __repr__ must not hide the report)
        return f"callback {callback!r}"


def _timed_run(self: asyncio.Handle) -> None:
    tid = threading.get_ident()
    outer = _running.get(tid)
    entry = _running[tid] = _Running(time.monotonic())
    try:
        _orig_handle_run(self)
    finally:
        seconds = time.monotonic() - entry.started
        if outer is None:
            _running.pop(tid, None)
        else:
            _running[tid] = outer
        if seconds >= LOOP_BLOCK_S:
            _blocks.append(_Block(seconds, _describe(self), threading.current_thread().name, entry.samples))


def _stack_inside_callback(frame) -> str:
    """The sampled stack from the callback down to the line it is blocked on."""
    frames = []
    while frame is not None and frame.f_code is not _timed_run.__code__:
        if frame.f_code is not _orig_handle_run.__code__:
            frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    return "".join(traceback.StackSummary.extract((f, f.f_lineno) for f in frames).format())


def _watchdog() -> None:
    period = max(0.005, LOOP_BLOCK_S / 10)
    while True:
        time.sleep(period)
        now = time.monotonic()
        late = [(tid, r) for tid, r in _running.copy().items() if now - r.started >= LOOP_BLOCK_S / 2]
        if not late:
            continue
        frames = sys._current_frames()
        for tid, r in late:
            frame = frames.get(tid)
            if frame is not None and _running.get(tid) is r and len(r.samples) < 3:
                stack = _stack_inside_callback(frame)
                if stack not in r.samples:
                    r.samples.append(stack)
        del frames, frame


_watchdog_thread = threading.Thread(target=_watchdog, name="peer-test-loop-watchdog", daemon=True)


def _format_blocks(blocks: list[_Block], phase: str) -> str:
    lines = [f"the event loop was blocked during {phase} (threshold {LOOP_BLOCK_S:g} s, "
             f"env PEER_TEST_LOOP_BLOCK_S):"]
    for b in blocks:
        lines.append(f"- {b.seconds:.3f} s in {b.what} (loop thread {b.thread!r})")
        for i, s in enumerate(b.samples):
            lines.append(f"  stack while blocked{f' (sample {i + 1})' if len(b.samples) > 1 else ''}:")
            lines.extend("    " + ln for ln in s.rstrip().splitlines())
        if not b.samples:
            lines.append("  (no stack sample: the blocking code held the GIL until it returned)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Leaked-thread detection
# ---------------------------------------------------------------------------------------------

_orig_thread_start = threading.Thread.start
_fixture_threads: set[threading.Thread] = set()  # started by a wider-scoped fixture still set up
_RUNNER_FRAMES = re.compile(r"[/\\](_pytest|pluggy|pytest_asyncio|pytest_timeout)[/\\]")


def _recording_start(self: threading.Thread) -> None:
    stack = [f for f in traceback.extract_stack(sys._getframe(1))
             if not _RUNNER_FRAMES.search(f.filename) and f.filename != __file__]
    self._peer_guard_started_at = "".join(traceback.StackSummary.from_list(stack[-10:]).format())
    _orig_thread_start(self)


def _allowed(thread: threading.Thread) -> bool:
    return thread is _watchdog_thread or any(re.fullmatch(p, thread.name) for p in ALLOWED_THREADS)


def _alive(thread: threading.Thread) -> bool:
    if isinstance(thread, threading._DummyThread):
        # A thread not started by Python that called into it once (a C library's thread) stays in
        # threading's table forever; ask the OS whether it still exists.
        native = getattr(thread, "native_id", None)
        return native is None or not os.path.isdir("/proc/self/task") or os.path.exists(f"/proc/self/task/{native}")
    return thread.is_alive()


def _leaked(item: pytest.Item, before: set[threading.Thread]) -> list[threading.Thread]:
    def new() -> list[threading.Thread]:
        return [t for t in threading.enumerate()
                if t not in before and t not in _fixture_threads and not _allowed(t) and _alive(t)]

    if not new():
        return []
    # pytest drops the test's fixture values right after teardown; drop them now, so a closed
    # client held only there does not look like a leak. Then collect garbage (see the docstring).
    if isinstance(getattr(item, "funcargs", None), dict):
        item.funcargs.clear()
    gc.collect()
    deadline = time.monotonic() + THREAD_GRACE_S
    collected_again = False
    while (left := new()) and time.monotonic() < deadline:
        for t in left:
            if not isinstance(t, threading._DummyThread):
                t.join(min(0.05, max(0.0, deadline - time.monotonic())))
        if not collected_again and time.monotonic() > deadline - THREAD_GRACE_S / 2:
            gc.collect()
            collected_again = True
        time.sleep(0.01)
    return left


def _global_names_of_executor(worker: threading.Thread) -> list[str]:
    """Module globals that hold the executor of a ThreadPoolExecutor worker (its first argument is a
    weak reference to the executor)."""
    ref = (getattr(worker, "_args", None) or (None,))[0]
    executor = ref() if callable(ref) else None
    if executor is None:
        return []
    return [f"{name}.{key}" for name, module in list(sys.modules.items())
            for key, value in list(getattr(module, "__dict__", {}).items()) if value is executor]


def _format_threads(threads: list[threading.Thread]) -> str:
    frames = sys._current_frames()
    lines = [f"the test left {len(threads)} thread(s) running {THREAD_GRACE_S:g} s after teardown "
             f"(stop/join them, shut executors down, close clients/servers; env PEER_TEST_THREAD_GRACE_S):"]
    for t in threads:
        fn = getattr(t, "_target", None)
        target = getattr(fn, "__qualname__", None) or (repr(fn) if fn else type(t).__name__)
        lines.append(f"- {t.name!r} (daemon={t.daemon}, target={target})")
        if target.endswith("_poll_wrapper"):
            lines.append("  (grpc.aio's poller: it runs while any grpc.aio channel, server or call object "
                         "exists, so one outlived the test: not closed/stopped, or still referenced)")
        if getattr(fn, "__module__", "") == "concurrent.futures.thread":
            lines.append("  (a worker of a ThreadPoolExecutor never shut down; workers start on the first "
                         "submit, so 'started at' is that submit, not where the executor was made)")
            if names := _global_names_of_executor(t):
                lines.append(f"  the executor is the module global {', '.join(names)}")
        started = getattr(t, "_peer_guard_started_at", None)
        if started:
            lines.append("  started at:")
            lines.extend("    " + ln for ln in started.rstrip().splitlines())
        frame = frames.get(t.ident)
        if frame is not None:
            lines.append("  now at:")
            lines.extend("    " + ln for ln in "".join(traceback.format_stack(frame, limit=6)).rstrip().splitlines())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------

_before_key = pytest.StashKey[set]()
_failed_key = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    asyncio.events.Handle._run = _timed_run
    threading.Thread.start = _recording_start
    if not _watchdog_thread.is_alive():
        _watchdog_thread.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    asyncio.events.Handle._run = _orig_handle_run
    threading.Thread.start = _orig_thread_start


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item):
    item.stash[_before_key] = set(threading.enumerate())
    _blocks.clear()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
    if fixturedef.scope == "function":
        return (yield)
    before = set(threading.enumerate())
    try:
        return (yield)
    finally:
        mine = set(threading.enumerate()) - before
        if mine:
            _fixture_threads.update(mine)
            fixturedef.addfinalizer(lambda: _fixture_threads.difference_update(mine))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    failed = False
    try:
        return (yield)
    except BaseException:
        failed = True
        raise
    finally:
        blocks, _blocks[:] = list(_blocks), []
        if blocks:
            message = _format_blocks(blocks, "setup/call")
            if failed:  # keep the test's own failure; put ours beside it
                item.add_report_section("call", "blocked event loop", message)
            else:
                pytest.fail(message, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed and report.when in ("setup", "call"):
        item.stash[_failed_key] = True
    return report


# tryfirst: the outermost wrapper, so the logging plugin has already let go of the test's log
# records (a record's exc_info can hold objects that own threads) when the leak check runs.
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    failed = False
    try:
        return (yield)
    except BaseException:
        failed = True
        raise
    finally:
        problems = []
        blocks, _blocks[:] = list(_blocks), []
        if blocks:  # during teardown, or during setup when setup failed and the call never ran
            problems.append(_format_blocks(blocks, "setup/teardown"))
        before = item.stash.get(_before_key, None)
        if before is not None and (leaked := _leaked(item, before)):
            problems.append(_format_threads(leaked))
        if problems:
            message = "\n".join(problems)
            if failed:
                item.add_report_section("teardown", "guard", message)
            elif item.stash.get(_failed_key, False):
                item.warn(pytest.PytestWarning(f"guard, after a failed test: {message}"))
            else:
                pytest.fail(message, pytrace=False)
