"""The state store: adopt, snapshots for donors, checkpoints written and loaded off the loop."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from peer.errors import StateError
from peer.sync.state import GlobalState, checkpoint_metadata, decode_state, encode_state, state_header
from peer.sync.store import StateStore


def _state(rnd: int, n: int = 1000, seed: int = 0) -> GlobalState:
    gen = torch.Generator().manual_seed(seed)
    return GlobalState(rnd, torch.randn(n, generator=gen), torch.randn(n, generator=gen))


@pytest.fixture
def pool():
    with ThreadPoolExecutor(1, thread_name_prefix="test-io") as executor:
        yield executor


def _store(tmp_path, pool, **kw) -> StateStore:
    return StateStore(_state(0), tmp_path, pool, checkpoint_interval_s=kw.pop("interval", 0), **kw)


async def test_adopt_makes_a_state_current_and_reports_it(tmp_path, pool):
    seen = []
    store = _store(tmp_path, pool, on_adopt=lambda s: seen.append(s.round))
    new = _state(5, seed=1)
    store.adopt(new)
    assert store.state is new and seen == [5]
    with pytest.raises(StateError):
        store.adopt(_state(6, n=10))  # another model's size
    assert store.state is new


async def test_a_snapshot_serves_the_state_memory_hashed_once_off_the_loop(tmp_path, pool):
    # Prepare
    store = _store(tmp_path, pool)
    loop_thread = threading.get_ident()
    threads = []
    original = store._snapshot_of

    def spy(state):
        threads.append(threading.get_ident())
        return original(state)

    store._snapshot_of = spy
    # Execute
    served = await store.async_serve()
    again = await store.async_serve()
    # Assert: the blob a joiner decodes, made of the state's own memory (no copy), its header
    # hashed once per state (the prefix cached), off the loop; pinned until released
    assert again.header is served.header and again.parts[0] is served.parts[0]
    assert served.parts[1].obj is not None and served.parts[1] == memoryview(store.state.params.numpy()).cast("B")
    assert loop_thread not in threads
    blob = served.tobytes()
    assert served.header == state_header(store.state, blob)  # what a donor announced for the joined blob
    assert blob == encode_state(store.state)
    state, _ = decode_state(blob, 1000)
    assert served.header.round == 0 and served.header.global_hash == store.state.global_hash == state.global_hash
    assert store.pinned(store.state) == 4  # two readers, each pinning the parameters and the momentum
    served.release()
    served.release()  # idempotent
    again.release()
    assert store.pinned(store.state) == 0
    store.adopt(_state(1, seed=2))
    header2, blob2 = await store.async_snapshot()
    assert header2.round == 1 and decode_state(blob2, 1000)[0].round == 1


async def test_a_provisional_state_is_not_served_until_settled(tmp_path, pool):
    # A round applied before its leader confirmed it (late confirmation) may be rolled back:
    # donors go on serving the last settled state until it is confirmed, so that no joiner
    # adopts a state its holder gives up.
    store = _store(tmp_path, pool)
    settled = store.state
    first, second = _state(1, seed=1), _state(2, seed=2)

    async def served_round() -> int:
        snap = await store.async_serve()
        try:
            return decode_state(snap.tobytes(), 1000)[0].round
        finally:
            snap.release()

    store.adopt(first, provisional=True)
    assert store.state is first and await served_round() == 0
    store.settle(first)
    assert await served_round() == 1
    # Rolled back: the state before it is current, and served, again.
    store.adopt(second, provisional=True)
    assert await served_round() == 1
    store.adopt(first)
    assert store.state is first and await served_round() == 1
    store.settle(second)  # a confirmation of a state no longer current changes nothing
    assert await served_round() == 1
    # A resync's adopt is settled at once.
    store.adopt(second, provisional=True)
    store.adopt(_state(7, seed=3))
    assert await served_round() == 7
    assert store.pinned(settled) == store.pinned(first) == 0


async def test_checkpoint_round_trip_and_resume(tmp_path, pool):
    outcomes = []
    store = _store(tmp_path, pool, on_checkpoint=outcomes.append)
    store.adopt(_state(7, seed=3))
    assert await store.async_checkpoint()
    assert outcomes == [True]
    resumed = _store(tmp_path, pool)
    assert await resumed.async_load()
    assert resumed.state.round == 7
    assert torch.equal(resumed.state.params, store.state.params)
    assert torch.equal(resumed.state.momentum, store.state.momentum)


async def test_a_torn_checkpoint_is_not_loaded(tmp_path, pool, caplog):
    store = _store(tmp_path, pool)
    store.adopt(_state(3, seed=4))
    await store.async_checkpoint()
    path = store.checkpoint_path
    path.write_bytes(path.read_bytes()[:-10])
    fresh = _store(tmp_path, pool)
    assert not await fresh.async_load()
    assert fresh.state.round == 0
    assert "torn or corrupt" in caplog.text


async def test_a_failed_write_is_reported_not_raised(tmp_path, pool):
    outcomes = []
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = StateStore(_state(0), blocker / "sub", pool, checkpoint_interval_s=0, on_checkpoint=outcomes.append)
    assert not await store.async_checkpoint()
    assert outcomes == [False]


async def test_background_checkpoints_respect_the_interval(tmp_path, pool, monkeypatch):
    # The store's clock is set by hand (a loaded machine once let 0.2 s of wall time pass between
    # creating the store and its first call, and a third checkpoint was written)
    import peer.sync.store

    now = [100.0]
    monkeypatch.setattr(peer.sync.store, "time", SimpleNamespace(monotonic=lambda: now[0]))
    outcomes = []
    store = _store(tmp_path, pool, interval=0.2, on_checkpoint=outcomes.append)
    now[0] += 0.19
    store.maybe_checkpoint()  # interval not yet passed since start
    now[0] += 0.02
    store.adopt(_state(1, seed=5))
    store.maybe_checkpoint()
    store.maybe_checkpoint()  # one is running or just done within the interval: no second one
    await store.async_checkpoint()
    assert outcomes == [True, True]
    now[0] += 0.21
    store.maybe_checkpoint()  # the interval passed again
    await store.async_checkpoint()
    assert outcomes == [True, True, True, True]


async def test_three_generations_are_kept_and_a_bad_newest_falls_back(tmp_path, pool, caplog):
    store = _store(tmp_path, pool)
    for rnd in range(1, 5):
        store.adopt(_state(rnd, seed=rnd))
        assert await store.async_checkpoint()
    paths = store.generations()
    assert [p.name for p in paths] == ["checkpoint.safetensors", "checkpoint.1.safetensors",
                                       "checkpoint.2.safetensors"]
    assert all(p.exists() for p in paths) and not (tmp_path / "checkpoint.3.safetensors").exists()
    # the newest is corrupt: the one before is loaded
    data = bytearray(paths[0].read_bytes())
    data[100] ^= 0xFF
    paths[0].write_bytes(bytes(data))
    fresh = _store(tmp_path, pool)
    assert await fresh.async_load()
    assert fresh.state.round == 3
    assert "not resuming from" in caplog.text and "checkpoint.safetensors" in caplog.text


async def test_a_checkpoint_is_plain_safetensors_with_its_metadata(tmp_path, pool):
    from safetensors.torch import load_file

    store = _store(tmp_path, pool, meta={"run_id": "r1", "task": "digits", "schema_hash": "abc"})
    state = _state(7, seed=3)
    store.adopt(state)
    assert await store.async_checkpoint()

    tensors = load_file(str(store.checkpoint_path))
    meta = checkpoint_metadata(store.checkpoint_path.read_bytes())

    assert torch.equal(tensors["global"], state.params) and torch.equal(tensors["momentum"], state.momentum)
    assert meta["round"] == "7" and meta["global_hash"] == state.global_hash
    assert meta["run_id"] == "r1" and meta["task"] == "digits" and meta["schema_hash"] == "abc"


async def test_a_checkpoint_of_another_model_is_not_loaded(tmp_path, pool, caplog):
    writer = _store(tmp_path, pool, meta={"schema_hash": "abc"})
    writer.adopt(_state(4, seed=4))
    assert await writer.async_checkpoint()

    other = _store(tmp_path, pool, meta={"schema_hash": "def"})

    assert not await other.async_load()
    assert other.state.round == 0 and "checkpoint is for another model" in caplog.text


async def test_an_old_peerstate1_checkpoint_is_loaded_when_it_fits_else_refused(tmp_path, pool, caplog):
    import hashlib

    from peer.sync.state import encode_state

    old = _state(9, seed=9)
    old.with_hash(hashlib.sha256(old.params.numpy().tobytes()).hexdigest())  # PEERSTATE1 named states by sha256
    blob = encode_state(old)
    (tmp_path / "checkpoint.bin").write_bytes(blob + hashlib.sha256(blob).digest())

    fits = _store(tmp_path, pool)
    assert await fits.async_load()
    assert fits.state.round == 9 and torch.equal(fits.state.params, old.params)

    bigger = StateStore(_state(0, n=1010), tmp_path, pool, checkpoint_interval_s=0)  # a model with buffers
    assert not await bigger.async_load()
    assert bigger.state.round == 0
    assert "old PEERSTATE1 checkpoint (parameters only, no buffers)" in caplog.text


async def test_a_reader_asking_during_an_in_place_step_waits_and_gets_the_new_state(tmp_path, pool):
    # Prepare: an outer step allowed to write over the current state
    store = _store(tmp_path, pool)
    old = store.state
    assert store.begin_step(old)
    # Execute: a donor asks while the step writes
    asking = asyncio.ensure_future(store.async_serve())
    for _ in range(5):
        await asyncio.sleep(0)
    waited = not asking.done()
    old.params.add_(1.0)  # the step, in place
    old.momentum.mul_(0.5)
    new = GlobalState(old.round + 1, old.params, old.momentum)
    store.adopt(new)
    store.end_step()
    served = await asking
    # Assert: it waited, then got the new state (never the old label on new bytes); the old
    # object is retired, so a late reader fails instead of reading round 1 as round 0
    assert waited and served.header.round == 1 and served.header.global_hash == new.global_hash
    assert decode_state(served.tobytes(), 1000)[0].global_hash == new.global_hash
    assert old.params is None and old.round == 0
    # ...and a pinned state is not given to the next step
    assert not store.begin_step(new)
    served.release()
    assert store.begin_step(new)
    store.end_step()


async def test_a_step_that_is_not_adopted_leaves_the_state_current(tmp_path, pool):
    store = _store(tmp_path, pool)
    state = store.state
    assert store.begin_step(state)
    with pytest.raises(StateError):
        store.begin_step(state)  # one step at a time
    store.end_step()  # e.g. a non-finite result, stepped into fresh tensors and dropped
    assert store.state is state and state.params is not None
    served = await store.async_serve()
    assert served.header.round == 0
    served.release()
    assert not store.begin_step(_state(1))  # not the current state
