"""The inner phase driven by the user's loop (``ExternalInner``) and ``peer.Swarm``'s argument
checks. No sockets: the loop side runs on an asyncio loop in a helper thread, the user's side on
the test's thread, as in library mode."""

from __future__ import annotations

import asyncio
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

from peer.errors import ConfigError
from peer.trainer.external import ExternalInner, SwarmStopped
from peer.trainer.params import flatten_state


class LoopThread:
    """An event loop on a helper thread: ``submit(coro)`` returns a concurrent future."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def _inner(model, steps=3, **kw) -> tuple[ExternalInner, ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    return ExternalInner(model, steps, pool, **kw), pool


def test_h_steps_of_the_users_loop_make_one_phase_with_the_exact_delta(loop):
    # Prepare
    model = _model()
    seen: list[tuple[int, float]] = []
    inner, pool = _inner(model, steps=3, on_step=lambda i, loss: seen.append((i, loss)))
    n = flatten_state(model).numel()
    start0, start1 = torch.full((n,), 0.5), torch.full((n,), -1.0)
    first = loop.submit(inner.run(0, start0, lambda: False))

    # Execute: pick up the phase, take three "optimizer steps" (here: add 0.25 to every parameter)
    inner.wait_phase(timeout_s=5)
    assert torch.equal(flatten_state(model), start0)
    returned, second = [], Future()  # of the second phase's future, once submitted
    for i, loss in enumerate([1.0, 2.0, 3.0]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25)
        if i == 2:
            # The H-th step blocks until the loop posts the next phase (the round in between).
            threading.Timer(0.3, lambda: second.set_result(loop.submit(inner.run(1, start1, lambda: False)))).start()
        returned.append(inner.step(samples=4, loss=loss))
    result = first.result(5)

    # Assert: delta = start - local exactly; samples, loss and steps as counted
    assert returned == [False, False, True]
    assert torch.equal(result.delta, start0 - (start0 + 0.75))
    assert (result.samples, result.steps, result.mean_loss, result.nonfinite) == (12, 3, 2.0, False)
    assert seen == [(0, 1.0), (1, 2.0), (2, 3.0)]
    # ... and the model now holds the next phase's start parameters, in place
    assert torch.equal(flatten_state(model), start1)
    # Closing ends the loop's wait for the unfinished phase, and the user's next step says why
    inner.close("closed by the test")
    assert second.result(5).result(5) is None
    with pytest.raises(SwarmStopped, match="closed by the test"):
        inner.step()
    pool.shutdown()


def test_a_nan_loss_marks_the_phase_nonfinite(loop):
    model = _model()
    inner, pool = _inner(model, steps=2)
    n = flatten_state(model).numel()
    fut = loop.submit(inner.run(0, torch.zeros(n), lambda: False))
    inner.wait_phase(timeout_s=5)
    assert inner.step(loss=math.nan) is False
    threading.Timer(0.2, lambda: inner.close("stopped")).start()
    with pytest.raises(SwarmStopped, match="stopped"):
        inner.step(loss=1.0)  # hands the phase over, then finds the swarm closed
    result = fut.result(5)
    assert result.nonfinite and result.mean_loss == 1.0
    pool.shutdown()


def test_close_wakes_a_waiting_loop_with_the_reason_and_should_stop_ends_a_phase(loop):
    model = _model()
    inner, pool = _inner(model)
    n = flatten_state(model).numel()
    # a phase the user never finishes ends with None once should_stop turns true
    stop = threading.Event()
    fut = loop.submit(inner.run(0, torch.zeros(n), stop.is_set))
    inner.wait_phase(timeout_s=5)
    stop.set()
    assert fut.result(5) is None
    # a user waiting for the next phase is woken by close, with its reason
    threading.Timer(0.2, lambda: inner.close("the daemon failed: boom")).start()
    with pytest.raises(SwarmStopped, match="boom"):
        inner.wait_phase()
    with pytest.raises(SwarmStopped, match="boom"):
        inner.step()
    pool.shutdown()


def test_wait_phase_times_out_with_a_clear_error():
    inner, pool = _inner(_model())
    with pytest.raises(SwarmStopped, match="did not hand over its parameters within"):
        inner.wait_phase(timeout_s=0.3)
    pool.shutdown()


def test_run_refuses_start_parameters_of_another_shape(loop):
    inner, pool = _inner(_model())
    with pytest.raises(ValueError, match="flat vector of 8 parameters"):
        loop.submit(inner.run(0, torch.zeros(5), lambda: False)).result(5)
    pool.shutdown()


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 32}, r"batch_size \(your loop picks its batches"),
    ({"rounds": 3, "threads": 2}, r"rounds .*threads"),
    ({"no_such_setting": 1}, "unknown setting 'no_such_setting'"),
    ({"inner_steps": 0}, "inner_steps must be >= 1"),
    ({"codec": 7}, "codec: expected a string"),
])
def test_swarm_refuses_bad_settings_before_starting_anything(tmp_path, kwargs, match):
    from peer import Swarm

    with pytest.raises(ConfigError, match=match):
        Swarm(_model(), run_id="lab1", insecure=True, state_dir=str(tmp_path), **kwargs)
    assert not [t for t in threading.enumerate() if t.name.startswith("peer-swarm")]


def test_swarm_needs_credentials_and_a_module(tmp_path, monkeypatch):
    from peer import Swarm

    monkeypatch.delenv("PEER_INSECURE", raising=False)
    monkeypatch.delenv("PEER_CREDENTIALS", raising=False)
    with pytest.raises(ConfigError, match="no run credentials"):
        Swarm(_model(), run_id="lab1", state_dir=str(tmp_path))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Swarm(object(), run_id="lab1", insecure=True)  # type: ignore[arg-type]


def test_close_waits_for_a_grpc_poller_that_is_ending_and_not_for_one_that_was_there_before():
    # gRPC's shutdown returns once its poller thread flagged its end; the thread itself may still
    # run a moment (it needs the GIL). A closed swarm waits for the one that started with it.
    from peer.swarm import _join_grpc_poller

    release_old, release_new = threading.Event(), threading.Event()
    old = threading.Thread(target=release_old.wait, name="Thread-1 (_poll_wrapper)", daemon=True)
    old.start()
    before = {t.ident for t in threading.enumerate()}
    new = threading.Thread(target=lambda: release_new.wait(0.3), name="Thread-2 (_poll_wrapper)", daemon=True)
    other = threading.Thread(target=release_new.wait, name="user-loader", daemon=True)
    new.start()
    other.start()
    try:
        _join_grpc_poller(before, timeout_s=5.0)

        assert not new.is_alive()                   # the swarm's own poller: waited for
        assert old.is_alive() and other.is_alive()  # one from before, a user's thread: not
    finally:
        release_old.set()
        release_new.set()
