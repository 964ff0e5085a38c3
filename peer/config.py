"""The daemon's configuration: one frozen, typed tree, resolved in one place.

Precedence, lowest first: built-in defaults < TOML file (``--config``) < ``PEER_*`` environment
variables < command-line flags. Every setting has one flat name that is unique across sections;
it is the TOML key inside its section, the environment variable ``PEER_<NAME>`` (upper case) and
the flag ``--<name>`` with dashes. Example: ``[sync] codec = "int4"`` in the file,
``PEER_CODEC=int4`` in the environment, ``--codec int4`` on the command line.

List values (``interfaces``, ``peers``) are TOML arrays, comma-separated in the environment, and
repeatable flags. Settings left at ``None`` take the task's own default (see ``peer.trainer``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peer.errors import ConfigError

ENV_PREFIX = "PEER_"


@dataclass(frozen=True)
class RunConfig:
    run_id: str = ""
    task: str = "digits"
    # A user's own data for the task (file or directory; see the task's docs).
    data: str | None = None
    # Shared by every peer of the run: the initial model is derived from it.
    seed: int = 0
    # Where this peer keeps its id and checkpoints. Default: ./peer-state/<run_id>.
    state_dir: str | None = None
    # Stable identity; default: a random id persisted in state_dir.
    peer_id: str | None = None
    # Stop after this many completed rounds (0: run until stopped).
    rounds: int = 0
    log_level: str = "INFO"
    # Diagnostics: write every round's own delta and the applied average here (.npy files).
    dump_dir: str | None = None


@dataclass(frozen=True)
class NetConfig:
    listen: str = "0.0.0.0:7070"
    # Address others should dial, when it differs from the listen address (NAT, 0.0.0.0).
    advertise: str | None = None
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9470
    # IPv4 addresses on which mDNS runs; empty: every interface (what a LAN wants).
    interfaces: tuple[str, ...] = ()
    # Static peers (host:port) for networks that multicast does not reach.
    peers: tuple[str, ...] = ()
    mdns: bool = True
    # Run credentials (a directory made by `peer keys new`): mutual TLS, ids from keys.
    credentials: str | None = None
    # Run without TLS and without credentials: anyone on the network can join (a warning).
    insecure: bool = False
    # The most members a peer admits; the most RPCs (and streams per connection) it serves at once.
    max_peers: int = 64
    max_concurrent_rpcs: int = 1024
    max_streams_per_connection: int = 128


@dataclass(frozen=True)
class TrainConfig:
    # auto (cuda if available), cpu, cuda or cuda:N (one GPU of several).
    device: str = "auto"
    # fp32, or bf16: the inner phase's forward pass and loss under torch.autocast; the global
    # state, the outer step and evaluation stay float32.
    precision: str = "fp32"
    # torch threads in this process; several peers on one machine must share its cores.
    threads: int = 1
    # Ranks on this machine training as one peer (data-parallel, torch.distributed: gloo on CPU,
    # NCCL with rank r on cuda:r); the swarm sees one member. See peer.trainer.workers.
    local_workers: int = 1
    inner_steps: int | None = None
    batch_size: int | None = None
    inner_lr: float | None = None
    # Inner learning rate at global inner step round * inner_steps + i: constant or cosine (to 0
    # at total_steps), both after a linear warm-up of warmup_steps.
    inner_lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    eval_every_rounds: int = 1


@dataclass(frozen=True)
class SyncConfig:
    codec: str = "int8"
    error_feedback: bool = True
    outer_lr: float | None = None
    outer_momentum: float | None = None
    chunk_bytes: int = 1 << 20
    # Leader's wait for the known peers to join a round, counted from the first join.
    matchmaking_timeout_s: float = 10.0
    # Upper bound (cap) of the all-reduce deadline; below it the deadline adapts to observed
    # round times (see deadline_factor).
    reduce_deadline_s: float = 30.0
    # How long a peer waits for others to show up before training alone at start-up.
    startup_grace_s: float = 3.0
    # Run each round while the next inner phase trains (one-step-delayed outer update).
    overlap: bool = False
    # Write a checkpoint at most this often, in the background (0: only when stopping).
    checkpoint_interval_s: float = 30.0
    # Adaptive deadlines: factor x the smoothed observed time + margin, capped by the settings
    # above; smoothing is the weight of the newest observation.
    deadline_factor: float = 4.0
    deadline_margin_s: float = 1.0
    deadline_smoothing: float = 0.3
    # An owner stops waiting for parts at this share of the all-reduce deadline, so that its
    # answer reaches every member before their own deadline.
    owner_cutoff_share: float = 0.5
    # How an owner combines the parts of its shard: mean (DiLoCo), trimmed_mean, centered_clip.
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    # One member's weight counts at most this multiple of its group's median weight.
    weight_cap_factor: float = 4.0
    # A part whose norm is this many times the median part's is left out (and counted).
    norm_outlier_factor: float = 10.0
    # A leader whose rounds fail this many times in a row (or that sends one invalid group) is
    # skipped for leader_backoff_s.
    leader_failure_limit: int = 3
    # A member whose part misses an owner's cut-off this many rounds in a row is left out of
    # that owner's groups for exclude_backoff_s.
    exclude_after_misses: int = 3
    # A model of at most this many values applies a round's answers before its leader confirms
    # them, settling the round (counting it, or rolling back if told ANSWERS_DIFFER) before its
    # next round sends anything: the confirmation leaves the round's path, and the previous
    # state (8 bytes a value) is kept until then. 0 (the default): confirm before applying,
    # whatever the size. Off by default: with a rogue owner answering members differently
    # (tests/fault/test_rogue.py owner_split), one run in three left one honest member alone
    # rounds ahead of the others, each side refusing the other's leader, until the test's end.
    confirm_late_max_numel: int = 0


@dataclass(frozen=True)
class TimeoutConfig:
    handshake_timeout_s: float = 5.0
    rpc_timeout_s: float = 5.0
    chunk_idle_timeout_s: float = 10.0
    state_transfer_timeout_s: float = 120.0
    # SIGTERM to exit; must stay below systemd's TimeoutStopSec and the 10 s promise.
    stop_grace_s: float = 8.0
    # Membership: a peer is pinged every heartbeat_interval_s and dropped after
    # heartbeat_misses unanswered pings (kill -9 sends no goodbye).
    heartbeat_interval_s: float = 1.0
    heartbeat_misses: int = 3
    # On SIGTERM in the middle of a round, wait at most this long for the round to end.
    finish_round_grace_s: float = 4.0
    # A peer that refused our handshake is not asked again for this long.
    refusal_backoff_s: float = 30.0
    # A call that found no connection waits this long for one before the peer counts as gone
    # (its channel may be in reconnect backoff from before the peer listened).
    reconnect_wait_s: float = 2.0
    # The local ranks (local_workers > 1) must meet within this long, and one collective
    # between them (a gradient all-reduce) may take at most this long.
    local_rank_timeout_s: float = 300.0
    # How long a failing leader is skipped (see leader_failure_limit).
    leader_backoff_s: float = 60.0
    # How long a member that keeps missing deadlines is left out (see exclude_after_misses).
    exclude_backoff_s: float = 60.0


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    # Fault-injection plan for tests (see peer.faults); never set in production.
    faults: str = ""


@dataclass(frozen=True)
class Settings:
    """The training settings in effect: the task's defaults merged with the user's overrides."""

    inner_steps: int
    batch_size: int
    inner_lr: float
    outer_lr: float
    outer_momentum: float


def resolve_settings(cfg: Config, defaults: Any) -> Settings:
    """``defaults``: the task's own (``Task.defaults``); a setting left at None takes it."""
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return Settings(
        inner_steps=pick(cfg.train.inner_steps, defaults.inner_steps),
        batch_size=pick(cfg.train.batch_size, defaults.batch_size),
        inner_lr=pick(cfg.train.inner_lr, defaults.inner_lr),
        outer_lr=pick(cfg.sync.outer_lr, defaults.outer_lr),
        outer_momentum=pick(cfg.sync.outer_momentum, defaults.outer_momentum),
    )


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "net": NetConfig,
    "train": TrainConfig,
    "sync": SyncConfig,
    "timeouts": TimeoutConfig,
}


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"duplicate config name {f.name}"
            index[f.name] = (section, f)
            _TYPES[f.name] = hints[f.name]
    return index


_TYPES: dict[str, Any] = {}
FIELDS = _field_index()


def _convert(name: str, value: Any, *, from_text: bool) -> Any:
    """Convert ``value`` to the declared type of setting ``name``; raise ConfigError if it cannot."""
    hint = _TYPES[name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if value is None or (from_text and optional and value == ""):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    try:
        if typing.get_origin(hint) is tuple:
            if from_text and isinstance(value, str):
                items = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                raise TypeError(f"expected a list, got {type(value).__name__}")
            if not all(isinstance(v, str) for v in items):
                raise TypeError("expected a list of strings")
            return tuple(items)
        if hint is bool:
            if isinstance(value, bool):
                return value
            if from_text and isinstance(value, str) and value.lower() in _BOOLS:
                return _BOOLS[value.lower()]
            raise TypeError(f"expected true/false, got {value!r}")
        if hint is int:
            if isinstance(value, bool) or (not from_text and not isinstance(value, int)):
                raise TypeError(f"expected an integer, got {value!r}")
            return int(value)
        if hint is float:
            if isinstance(value, bool) or (not from_text and not isinstance(value, (int, float))):
                raise TypeError(f"expected a number, got {value!r}")
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise TypeError(f"expected a string, got {value!r}")
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None
    raise ConfigError(f"{name}: unsupported type {hint}")  # pragma: no cover


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _from_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, body in doc.items():
        if key == "faults" and isinstance(body, str):
            values["faults"] = body
            continue
        if key not in SECTIONS or not isinstance(body, dict):
            raise ConfigError(f"{path}: unknown section [{key}]; known: {', '.join(SECTIONS)}")
        for name, value in body.items():
            if name not in FIELDS or FIELDS[name][0] != key:
                raise ConfigError(f"{path}: unknown setting {name!r} in [{key}]")
            values[name] = _convert(name, value, from_text=False)
    return values


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX):].lower()
        if name == "faults":
            values["faults"] = text
        elif name in FIELDS:
            values[name] = _convert(name, text, from_text=True)
        # Other PEER_* variables are not ours to judge (shells set odd things); ignore them.
    return values


def load_config(
    cli: Mapping[str, Any] | None = None,
    *,
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Resolve defaults < ``config_file`` < ``env`` (``os.environ`` if None) < ``cli``.

    ``cli`` maps flat setting names to values already parsed by the CLI; ``None`` values are
    ignored (flag not given). Raises ConfigError naming the offending setting.
    """
    values: dict[str, Any] = {}
    if config_file:
        values.update(_from_toml(config_file))
    values.update(_from_env(os.environ if env is None else env))
    for name, value in (cli or {}).items():
        if value is None:
            continue
        if name == "faults":
            values["faults"] = value
            continue
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _convert(name, value, from_text=isinstance(value, str))
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in values.items():
        if name == "faults":
            continue
        per_section[FIELDS[name][0]][name] = value
    cfg = Config(
        **{s: SECTIONS[s](**kw) for s, kw in per_section.items()},
        faults=values.get("faults", ""),
    )
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that need no other module; raises ConfigError."""
    checks = [
        (cfg.train.threads >= 1, "threads must be >= 1"),
        (1 <= cfg.train.local_workers <= 64, "local_workers must be in [1, 64]"),
        (cfg.train.inner_steps is None or cfg.train.inner_steps >= 1, "inner_steps must be >= 1"),
        (cfg.train.batch_size is None or cfg.train.batch_size >= 1, "batch_size must be >= 1"),
        (cfg.sync.outer_lr is None or cfg.sync.outer_lr > 0, "outer_lr must be > 0"),
        (cfg.sync.outer_momentum is None or 0 <= cfg.sync.outer_momentum < 1, "outer_momentum must be in [0, 1)"),
        (4096 <= cfg.sync.chunk_bytes <= (1 << 20), "chunk_bytes must be in [4096, 1048576]"),
        (0 <= cfg.net.metrics_port <= 65535, "metrics_port must be in [0, 65535]"),
        (cfg.net.max_peers >= 1, "max_peers must be >= 1"),
        (cfg.net.max_concurrent_rpcs >= 16, "max_concurrent_rpcs must be >= 16"),
        (cfg.net.max_streams_per_connection >= 8, "max_streams_per_connection must be >= 8"),
        (not (cfg.net.credentials and cfg.net.insecure), "credentials and insecure exclude each other"),
        (not (cfg.net.credentials and cfg.run.peer_id),
         "peer_id cannot be set with credentials: a peer's id is derived from its key"),
        (cfg.run.rounds >= 0, "rounds must be >= 0"),
        (cfg.sync.checkpoint_interval_s >= 0, "checkpoint_interval_s must be >= 0"),
        (cfg.train.device == "auto" or cfg.train.device == "cpu" or cfg.train.device.startswith("cuda"),
         "device must be auto, cpu or cuda[:N]"),
        (cfg.train.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {cfg.train.precision!r}"),
        (cfg.train.inner_lr_schedule in ("constant", "cosine"),
         f"inner_lr_schedule must be constant or cosine, got {cfg.train.inner_lr_schedule!r}"),
        (cfg.train.warmup_steps >= 0, "warmup_steps must be >= 0"),
        (cfg.train.total_steps >= 0, "total_steps must be >= 0"),
        (cfg.train.inner_lr_schedule != "cosine" or cfg.train.total_steps > cfg.train.warmup_steps,
         "inner_lr_schedule cosine needs total_steps > warmup_steps (the step at which the rate reaches 0)"),
    ]
    for name in ("matchmaking_timeout_s", "reduce_deadline_s", "deadline_factor"):
        checks.append((getattr(cfg.sync, name) > 0, f"{name} must be > 0"))
    checks += [
        (cfg.sync.deadline_margin_s >= 0, "deadline_margin_s must be >= 0"),
        (0 < cfg.sync.deadline_smoothing <= 1, "deadline_smoothing must be in (0, 1]"),
        (0 < cfg.sync.owner_cutoff_share < 1, "owner_cutoff_share must be in (0, 1)"),
        (cfg.sync.aggregation in ("mean", "trimmed_mean", "centered_clip"),
         "aggregation must be mean, trimmed_mean or centered_clip"),
        (0 <= cfg.sync.trim_fraction < 0.5, "trim_fraction must be in [0, 0.5)"),
        (cfg.sync.weight_cap_factor >= 1, "weight_cap_factor must be >= 1"),
        (cfg.sync.norm_outlier_factor > 1, "norm_outlier_factor must be > 1"),
        (cfg.sync.leader_failure_limit >= 1, "leader_failure_limit must be >= 1"),
        (cfg.sync.exclude_after_misses >= 1, "exclude_after_misses must be >= 1"),
        (cfg.sync.confirm_late_max_numel >= 0, "confirm_late_max_numel must be >= 0"),
    ]
    for f in dataclasses.fields(TimeoutConfig):
        checks.append((getattr(cfg.timeouts, f.name) > 0, f"{f.name} must be > 0"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.run.run_id:
        validate_run_id(cfg.run.run_id)


def validate_run_id(run_id: str) -> None:
    """Raise ConfigError unless ``run_id`` is 1-48 letters, digits, '-', '_' or '.'."""
    if not run_id or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in run_id):
        raise ConfigError(f"run_id {run_id!r} may only hold letters, digits, '-', '_' and '.'")
    if len(run_id) > 48:
        raise ConfigError("run_id is longer than 48 characters")
