"""The device mirror (``peer.sync.mirror``) run with device="cpu": the code path a GPU takes
(payload bytes copied to the device, ``decode_torch``, the in-place step), bit for bit the host's
decode and outer step. ``bench/gpu_check.sh`` runs the same comparison on a GPU."""

from __future__ import annotations

import logging

import pytest
import torch

from peer.codec import CODEC_NAMES, get_codec
from peer.sync.mirror import Answers, DeviceMirror
from peer.sync.outer import outer_step_hashed, tensor_digest
from peer.sync.round import shard_bounds
from peer.sync.state import GlobalState

NUMEL, PARAMS, INTS = 3001, 2980, ((2990, 3001),)  # the last 21 values buffers, 11 of them integer
STEP = {"lr": 0.7, "momentum": 0.9, "param_numel": PARAMS, "int_slices": INTS}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _answers(codec: str, rnd: int, k: int = 3) -> Answers:
    """What the owners of ``k`` shards answer in round ``rnd``: each shard's average encoded once."""
    gen = torch.Generator().manual_seed(rnd)
    avg = torch.randn(NUMEL, generator=gen) * 0.01
    avg[2990:] = 0  # integer buffers send no change
    c = get_codec(codec)
    return Answers(codec, tuple((s, e, c.encode(avg[s:e])) for s, e in shard_bounds(NUMEL, k)))


def _host_round(state: GlobalState, answers: Answers) -> GlobalState:
    """The round as the driver runs it on the host: decode_into one delta, then the hashed step."""
    codec = get_codec(answers.codec)
    avg = torch.empty(NUMEL)
    for s, e, payload in answers.shards:
        codec.decode_into(payload, avg[s:e])
    params, buf, digest, finite = outer_step_hashed(state.params, avg, state.momentum, **STEP)
    assert finite
    return GlobalState(state.round + 1, params, buf).with_hash(digest)


def _initial() -> GlobalState:
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(NUMEL, generator=gen)
    params[2990:] = torch.arange(11.0)
    return GlobalState(0, params, torch.zeros(NUMEL))


def _mirror() -> DeviceMirror:
    return DeviceMirror("cpu", **STEP)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_rounds_applied_on_the_device_path_give_the_hosts_bits(codec):
    # Prepare
    mirror, state = _mirror(), _initial()
    kept = state.params.clone()
    mirror.start(state)
    for rnd in range(4):
        answers = _answers(codec, rnd)
        after = _host_round(state, answers)
        # Execute
        assert mirror.advance(state, answers, after)
        # Assert: the parameters the next phase starts from are the host's new state, bit for
        # bit (and hash to it), the momentum too; the host's states were not touched
        start = mirror.start(after)
        assert torch.equal(_bits(start), _bits(after.params)) and tensor_digest(start) == after.global_hash
        assert torch.equal(_bits(mirror._buf), _bits(after.momentum))
        state = after
    assert torch.equal(_initial().params, kept)
    assert (mirror.copies, mirror.advances, mirror.enabled) == (1, 4, True)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_the_device_decode_gives_the_host_decode_bits(codec):
    # decode_torch is what the mirror runs (on CUDA as here on CPU); decode_into what the host runs
    c = get_codec(codec)
    for s, e, payload in _answers(codec, 7, k=2).shards:
        host = torch.empty(e - s)
        c.decode_into(payload, host)
        assert torch.equal(_bits(c.decode_torch(payload, e - s, "cpu")), _bits(host))


def test_a_state_the_mirror_does_not_hold_is_copied_in():
    # Prepare: the mirror holds round 0; the peer then resyncs to another state
    mirror, state = _mirror(), _initial()
    mirror.start(state)
    donor = GlobalState(5, state.params + 1, state.momentum + 1)
    answers = _answers("int8", 5)
    after = _host_round(donor, answers)
    # Execute / Assert: it cannot apply a round to a state it does not hold; it copies instead
    assert not mirror.advance(donor, answers, after)
    start = mirror.start(after)
    assert torch.equal(start, after.params) and start is not after.params
    assert (mirror.copies, mirror.advances, mirror.enabled) == (2, 0, True)


def test_a_device_that_computes_other_bits_turns_the_mirror_off(caplog):
    # Prepare: the device's copy differs from the host's in one value (as a device whose
    # arithmetic differed would leave it)
    mirror, state = _mirror(), _initial()
    mirror.start(state)[17] += 1e-3
    answers = _answers("int8", 0)
    after = _host_round(state, answers)
    # Execute
    with caplog.at_level(logging.ERROR, logger="peer.sync.mirror"):
        applied = mirror.advance(state, answers, after)
    # Assert: caught by the first (full) comparison; from now on the host's state is used
    assert not applied and not mirror.enabled and mirror.off_reason == "bits"
    assert "other bits than on the host (1 of 3001 parameters values)" in caplog.text
    assert mirror.start(after) is after.params


def test_later_rounds_are_checked_by_a_sample():
    # Prepare: one round compared in full, then the device's copy goes wrong everywhere
    mirror, state = _mirror(), _initial()
    mirror.start(state)
    after = _host_round(state, _answers("int8", 0))
    assert mirror.advance(state, _answers("int8", 0), after)
    mirror.start(after).mul_(1.5)
    answers = _answers("int8", 1)
    # Execute / Assert
    assert not mirror.advance(after, answers, _host_round(after, answers)) and not mirror.enabled


def test_answers_that_do_not_decode_turn_the_mirror_off():
    mirror, state = _mirror(), _initial()
    mirror.start(state)
    good = _answers("int8", 0)
    after = _host_round(state, good)
    short = Answers("int8", good.shards[:-1])
    assert not mirror.advance(state, short, after) and not mirror.enabled and mirror.off_reason == "error"
