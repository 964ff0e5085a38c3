"""The suite's guards (tests/conftest.py) catch a blocked event loop and a leaked thread, and let a
clean test pass. Each case runs the real conftest on a tiny suite in a fresh pytest process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

SUITE = '''
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest


async def test_clean():
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.01)
    await loop.run_in_executor(None, time.sleep, 0.4)  # blocking, but off the loop: fine
    await asyncio.to_thread(time.sleep, 0.01)


def test_clean_thread_that_is_joined():
    t = threading.Thread(target=time.sleep, args=(0.01,), name="joined")
    t.start()
    t.join()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(time.sleep, 0.01).result()


def test_thread_finishing_within_the_grace_period():
    threading.Thread(target=time.sleep, args=(0.1,), name="finishing-soon").start()


async def test_sleep_blocks_the_loop():
    await asyncio.sleep(0)
    time.sleep(0.6)


def test_asyncio_run_in_a_sync_test_is_guarded_too():
    async def main():
        time.sleep(0.6)
    asyncio.run(main())


@pytest.fixture
async def blocking_fixture():
    time.sleep(0.6)
    yield


async def test_blocking_async_fixture(blocking_fixture):
    pass


STOP = threading.Event()


def test_leaks_a_thread():
    threading.Thread(target=STOP.wait, name="leaky-worker", daemon=True).start()


LEAKY_POOL = ThreadPoolExecutor(1, thread_name_prefix="never-shut-down")


def test_leaks_an_executor():  # a module-level pool: its worker starts here and is never stopped
    LEAKY_POOL.submit(time.sleep, 0).result()


def test_fails_and_leaks():  # already red: the leak is a warning, not a second error
    threading.Thread(target=STOP.wait, name="leaky-after-failure", daemon=True).start()
    assert False


@pytest.fixture(scope="module")
def module_worker():
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, name="module-worker")
    worker.start()
    yield worker
    stop.set()
    worker.join()


def test_uses_a_module_scoped_thread(module_worker):
    assert module_worker.is_alive()


def test_uses_it_again(module_worker):
    assert module_worker.is_alive()


async def test_failing_test_that_also_blocks():
    time.sleep(0.6)
    assert 1 == 2
'''


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(summary line, whole output) of one run of the real conftest on SUITE, in a fresh process."""
    root = tmp_path_factory.mktemp("guarded")
    (root / "conftest.py").write_text(CONFTEST.read_text())
    (root / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    (root / "test_suite.py").write_text(SUITE)
    env = {**os.environ, "PEER_TEST_LOOP_BLOCK_S": "0.3", "PEER_TEST_THREAD_GRACE_S": "0.5"}
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfE", "test_suite.py"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    return out.strip().splitlines()[-1], out


def _section(text: str, title: str) -> str:
    """The failure report of one test, from its ____ title line to the next one."""
    start = text.index(f" {title} ")
    end = text.find("\n____", start + 1)
    end2 = text.find("\n====", start + 1)
    return text[start:min(e for e in (end, end2) if e != -1)]


def test_guard_verdicts(outcome) -> None:
    summary, out = outcome
    # Clean tests pass; the loop blocks fail in their call (or setup) phase; leaks error at teardown.
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (\w+)", summary))
    assert counts == {"failed": 5, "passed": 7, "warning": 1, "errors": 2}, out
    for name in ("test_sleep_blocks_the_loop", "test_asyncio_run_in_a_sync_test_is_guarded_too",
                 "test_blocking_async_fixture", "test_failing_test_that_also_blocks"):
        assert f"FAILED test_suite.py::{name}" in out, out
    for name in ("test_leaks_a_thread", "test_leaks_an_executor"):
        assert f"ERROR test_suite.py::{name}" in out, out
    for name in ("test_clean", "test_clean_thread_that_is_joined", "test_thread_finishing_within_the_grace_period",
                 "test_uses_a_module_scoped_thread", "test_uses_it_again"):
        assert f"::{name} " not in out.split("short test summary info")[-1], out


def test_blocked_loop_report_names_the_task_and_the_blocking_line(outcome) -> None:
    _, out = outcome
    report = _section(out, "test_sleep_blocks_the_loop")
    assert "the event loop was blocked during setup/call (threshold 0.3 s" in report, report
    assert "running 'test_sleep_blocks_the_loop'" in report, report
    assert "stack while blocked" in report and "time.sleep(0.6)" in report, report
    assert "in test_sleep_blocks_the_loop" in report, report

    report = _section(out, "test_asyncio_run_in_a_sync_test_is_guarded_too")
    assert "running 'test_asyncio_run_in_a_sync_test_is_guarded_too.<locals>.main'" in report, report

    report = _section(out, "test_blocking_async_fixture")
    assert "in blocking_fixture" in report and "time.sleep(0.6)" in report, report


def test_a_failing_test_keeps_its_own_error_and_gets_the_guard_report_beside_it(outcome) -> None:
    _, out = outcome
    report = _section(out, "test_failing_test_that_also_blocks")
    assert "assert 1 == 2" in report, report
    assert "the event loop was blocked" in report, report


def test_a_failing_test_that_leaks_gets_a_warning_not_a_second_error(outcome) -> None:
    _, out = outcome
    assert "FAILED test_suite.py::test_fails_and_leaks" in out and "ERROR test_suite.py::test_fails_and_leaks" not in out
    warnings = _section(out, "warnings summary")
    assert "guard, after a failed test" in warnings and "'leaky-after-failure'" in warnings, warnings


def test_leak_report_names_the_thread_and_where_it_was_started(outcome) -> None:
    _, out = outcome
    report = _section(out, "ERROR at teardown of test_leaks_a_thread")
    assert "left 1 thread(s) running" in report and "'leaky-worker' (daemon=True, target=Event.wait)" in report, report
    assert "started at:" in report and "in test_leaks_a_thread" in report, report
    report = _section(out, "ERROR at teardown of test_leaks_an_executor")
    assert "'never-shut-down_0' (daemon=False, target=_worker)" in report, report
    assert "in test_leaks_an_executor" in report, report
    assert "the executor is the module global test_suite.LEAKY_POOL" in report, report
