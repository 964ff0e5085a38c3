"""Pure logic of the local ranks (peer.trainer.workers): no process group, no sockets."""

from __future__ import annotations

import pytest

from peer.config import load_config
from peer.errors import ConfigError
from peer.trainer.workers import LocalRanks, RankSpec, Torchrun, rank_device, rank_stream_id


def _spec(**kw) -> RankSpec:
    base = dict(task="digits", data=None, seed=0, stream_id="s", device="cpu", threads=1, batch_size=8,
                inner_lr=1e-3, rank=0, world=2, store_port=0, timeout_s=60.0, parent_pid=0)
    return RankSpec(**{**base, **kw})


def test_rank_zero_keeps_the_peers_stream_and_the_others_get_their_own():
    assert rank_stream_id("abc", 0) == "abc"
    assert [rank_stream_id("abc", r) for r in (1, 2)] == ["abc/rank1", "abc/rank2"]


def test_rank_devices():
    assert rank_device("cuda:1", 0, 1) == "cuda:1"  # one rank keeps what was asked
    assert [rank_device("cpu", r, 3) for r in range(3)] == ["cpu"] * 3
    with pytest.raises(ConfigError, match="cuda:1"):
        rank_device("cuda:1", 0, 2)


def test_spec_round_trips_and_bad_specs_are_refused():
    spec = _spec(rank=1, store_port=1234, parent_pid=99)
    assert RankSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ConfigError, match="bad local rank spec"):
        RankSpec.from_json('{"task": "digits"}')
    with pytest.raises(ConfigError, match="bad local rank spec"):
        RankSpec.from_json("not json")


def test_local_ranks_refuses_bad_settings_before_starting_anything():
    with pytest.raises(ConfigError, match="rank 0 of 2 or more"):
        LocalRanks(_spec(world=1), None, 3)
    with pytest.raises(ConfigError, match="rank 0 of 2 or more"):
        LocalRanks(_spec(rank=1), None, 3)
    with pytest.raises(ConfigError, match="cuda:1"):
        LocalRanks(_spec(device="cuda:1"), None, 3)


TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
            "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True"}


def test_torchrun_environment():
    assert Torchrun.from_env({}) is None
    assert Torchrun.from_env({**TORCHRUN, "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "RANK": "0"}) is None
    assert Torchrun.from_env(TORCHRUN) == Torchrun(1, 2, "localhost", 29500, True)
    with pytest.raises(ConfigError, match="one machine"):
        Torchrun.from_env({**TORCHRUN, "WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="malformed"):
        Torchrun.from_env({**TORCHRUN, "MASTER_PORT": "x"})
    with pytest.raises(ConfigError, match="outside"):
        Torchrun.from_env({**TORCHRUN, "RANK": "2"})


@pytest.mark.parametrize("bad", ["0", "65"])
def test_local_workers_out_of_range_is_refused(bad):
    with pytest.raises(ConfigError, match="local_workers"):
        load_config({"local_workers": bad}, env={})
