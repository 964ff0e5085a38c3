"""Config precedence (defaults < TOML < PEER_* env < CLI), types and validation."""

from __future__ import annotations

import pytest

from peer.config import Config, load_config
from peer.errors import ConfigError


def _toml(tmp_path, text: str) -> str:
    path = tmp_path / "peer.toml"
    path.write_text(text)
    return str(path)


def test_defaults_without_any_source():
    cfg = load_config({}, env={})
    assert cfg == Config()
    assert cfg.sync.codec == "int8" and cfg.net.interfaces == () and cfg.train.threads == 1


def test_precedence_file_then_env_then_cli(tmp_path):
    # Prepare
    path = _toml(tmp_path, '[sync]\ncodec = "fp16"\nouter_lr = 0.3\n[run]\nrun_id = "from-file"\nseed = 5\n'
                           '[net]\ninterfaces = ["10.0.0.1"]\n')
    env = {"PEER_CODEC": "int4", "PEER_RUN_ID": "from-env"}
    # Execute
    cfg = load_config({"run_id": "from-cli"}, config_file=path, env=env)
    # Assert: CLI beats env beats file beats defaults
    assert cfg.run.run_id == "from-cli"
    assert cfg.sync.codec == "int4"
    assert cfg.sync.outer_lr == 0.3 and cfg.run.seed == 5
    assert cfg.net.interfaces == ("10.0.0.1",)
    assert cfg.sync.reduce_deadline_s == Config().sync.reduce_deadline_s


def test_env_values_are_converted_to_their_types():
    cfg = load_config({}, env={"PEER_THREADS": "3", "PEER_ERROR_FEEDBACK": "off", "PEER_OUTER_LR": "0.5",
                               "PEER_INTERFACES": "127.0.0.1, 10.1.1.1", "PEER_INNER_STEPS": ""})
    assert cfg.train.threads == 3
    assert cfg.sync.error_feedback is False
    assert cfg.sync.outer_lr == 0.5
    assert cfg.net.interfaces == ("127.0.0.1", "10.1.1.1")
    assert cfg.train.inner_steps is None


def test_cli_strings_are_converted_and_none_means_not_given():
    cfg = load_config({"threads": "2", "codec": None, "peers": ["a:1", "b:2"]}, env={"PEER_CODEC": "bf16"})
    assert cfg.train.threads == 2 and cfg.sync.codec == "bf16" and cfg.net.peers == ("a:1", "b:2")


def test_unrelated_peer_env_vars_are_ignored():
    assert load_config({}, env={"PEER_SOMETHING_ELSE": "x"}) == Config()


@pytest.mark.parametrize("text, needle", [
    ("[sync]\ncodec = 3\n", "codec"),
    ("[sync]\nnot_a_key = 1\n", "not_a_key"),
    ("[nope]\nx = 1\n", "[nope]"),
    ("[run]\nrun_id = \"x\"\n[sync]\ncodec = \"int8\"\nouter_lr = \"fast\"\n", "outer_lr"),
    ("[run\n", "not valid TOML"),
])
def test_bad_files_name_the_offending_setting(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config({}, config_file=_toml(tmp_path, text), env={})
    assert needle in str(err.value)


@pytest.mark.parametrize("cli, needle", [
    ({"threads": "0"}, "threads"),
    ({"threads": "many"}, "threads"),
    ({"chunk_bytes": str(8 << 20)}, "chunk_bytes"),
    ({"outer_momentum": "1.5"}, "outer_momentum"),
    ({"run_id": "has space"}, "run_id"),
    ({"device": "tpu"}, "device"),
    ({"error_feedback": "maybe"}, "error_feedback"),
    ({"precision": "fp16"}, "precision must be fp32 or bf16"),
    ({"inner_lr_schedule": "linear"}, "inner_lr_schedule must be constant or cosine"),
    ({"inner_lr_schedule": "cosine"}, "cosine needs total_steps > warmup_steps"),
    ({"inner_lr_schedule": "cosine", "warmup_steps": "10", "total_steps": "10"}, "total_steps > warmup_steps"),
    ({"warmup_steps": "-1"}, "warmup_steps must be >= 0"),
])
def test_bad_values_are_refused(cli, needle):
    with pytest.raises(ConfigError) as err:
        load_config(cli, env={})
    assert needle in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config({}, config_file=str(tmp_path / "missing.toml"), env={})


def test_config_is_frozen():
    cfg = load_config({}, env={})
    with pytest.raises(AttributeError):
        cfg.sync.codec = "fp32"  # type: ignore[misc]


def test_readme_documents_every_setting():
    from pathlib import Path

    from peer.config import FIELDS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [name for name in FIELDS if name not in readme]
    assert not missing, f"settings missing from README.md: {missing}"


def test_schedule_and_precision_from_file_env_and_cli(tmp_path):
    path = tmp_path / "peer.toml"
    path.write_text('[train]\ninner_lr_schedule = "cosine"\nwarmup_steps = 5\ntotal_steps = 100\n')

    cfg = load_config({"total_steps": "200"}, config_file=str(path), env={"PEER_PRECISION": "bf16"})

    t = cfg.train
    assert (t.inner_lr_schedule, t.warmup_steps, t.total_steps, t.precision) == ("cosine", 5, 200, "bf16")


def test_local_workers_take_bf16_and_a_schedule():
    cfg = load_config({"local_workers": "2", "precision": "bf16", "inner_lr_schedule": "cosine",
                       "warmup_steps": "2", "total_steps": "50"}, env={})
    assert (cfg.train.local_workers, cfg.train.precision, cfg.train.inner_lr_schedule) == (2, "bf16", "cosine")
