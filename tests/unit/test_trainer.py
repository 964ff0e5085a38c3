"""Unit tests of peer.trainer: task loading, seeded init, data streams, flat params, inner loop."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Iterator

import pytest
import torch

from peer.errors import StateError, TaskError
from peer.trainer import (
    BUILTIN_TASKS,
    InnerTrainer,
    Task,
    TaskDefaults,
    LRSchedule,
    assign_flat_state,
    flatten_state,
    init_model,
    load_task,
    param_count,
    schema_hash,
    schema_of,
)
from peer.trainer.tasks.fashion import DEFAULT_DIR as FASHION_DIR

FASHION_PRESENT = os.path.isfile(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz"))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> Task:
    return load_task("digits")


class NanTask(Task):
    """A tiny task whose loss turns NaN from the third call on."""

    name = "nan"
    defaults = TaskDefaults(inner_steps=5, batch_size=4, inner_lr=1e-3, outer_lr=0.5)

    def __init__(self, data_path: str | None = None) -> None:
        super().__init__(data_path)
        self.calls = 0

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(3, 2)

    def batches(self, seed: int, stream_id: str, batch_size: int):
        while True:
            yield torch.ones(batch_size, 3), torch.zeros(batch_size, dtype=torch.long)

    def loss(self, model, batch):
        self.calls += 1
        out = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
        return out * float("nan") if self.calls >= 3 else out

    def evaluate(self, model, device):
        return {"loss": 0.0}


# --- load_task -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in BUILTIN_TASKS if n != "fashion"])
def test_load_builtin_task(name: str) -> None:
    task = load_task(name)

    assert isinstance(task, Task)
    assert task.name == name
    assert isinstance(task.defaults, TaskDefaults)
    x, y = next(task.batches(0, "a", task.defaults.batch_size))
    assert x.shape[0] == task.defaults.batch_size
    assert math.isfinite(task.loss(init_model(task, 0), (x, y)).item())


@pytest.mark.skipif(
    not FASHION_PRESENT,
    reason=f"no Fashion-MNIST in {FASHION_DIR}: apt-get install -y dataset-fashion-mnist",
)
def test_load_fashion() -> None:
    task = load_task("fashion")

    x, y = next(task.batches(0, "a", 64))
    assert x.shape == (64, 784) and x.dtype == torch.float32
    assert y.shape == (64,) and int(y.max()) < 10
    metrics = task.evaluate(init_model(task, 0), torch.device("cpu"))
    assert set(metrics) == {"loss", "accuracy"}
    assert param_count(init_model(task, 0)) == 784 * 256 + 256 + 256 * 10 + 10


def test_fashion_missing_dir_says_how(tmp_path) -> None:
    with pytest.raises(TaskError, match="IDX"):
        load_task("fashion", str(tmp_path))


def test_charlm_user_text_and_1m_variant(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("to be or not to be, that is the question. " * 200)

    task = load_task("charlm", str(tmp_path))
    big = load_task("peer.trainer.tasks.charlm:charlm_1m", str(tmp_path / "a.txt"))

    x, y = next(task.batches(1, "p", 8))
    assert x.shape == y.shape == (8, 64)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert 900_000 < param_count(init_model(big, 0)) < 1_200_000
    assert big.defaults.batch_size < task.defaults.batch_size


def test_load_task_from_module_attr(tmp_path, monkeypatch) -> None:
    (tmp_path / "mytasks.py").write_text(
        textwrap.dedent(
            """
            from peer.trainer.tasks.digits import DigitsTask

            class MyTask(DigitsTask):
                name = "mine"

            def factory():
                return MyTask()

            def not_a_task_factory():
                return 42

            NOT_CALLABLE = 3

            class Plain:
                pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    assert load_task("mytasks:MyTask").name == "mine"
    assert load_task("mytasks:factory").name == "mine"
    with pytest.raises(TaskError, match="not a Task"):
        load_task("mytasks:not_a_task_factory")
    with pytest.raises(TaskError, match="not a Task"):
        load_task("mytasks:NOT_CALLABLE")
    with pytest.raises(TaskError, match="not a peer Task"):
        load_task("mytasks:Plain")
    with pytest.raises(TaskError, match="no attribute"):
        load_task("mytasks:missing")
    with pytest.raises(TaskError, match="must accept"):
        load_task("mytasks:factory", "/some/data")


def test_load_task_errors() -> None:
    with pytest.raises(TaskError, match="digits, fashion, charlm"):
        load_task("nope")
    with pytest.raises(TaskError, match="cannot import"):
        load_task("no_such_module_xyz:Task")
    with pytest.raises(TaskError, match="does not exist"):
        load_task("digits", "/no/such/file.csv")


# --- init_model and data streams -----------------------------------------------------------


def test_init_model_is_seeded_and_leaves_global_rng_alone(digits: Task) -> None:
    rng_before = torch.get_rng_state()

    a = flatten_state(init_model(digits, 7))
    b = flatten_state(init_model(digits, 7))
    c = flatten_state(init_model(digits, 8))

    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_streams_differ_by_stream_id_and_repeat_by_seed(digits: Task) -> None:
    rng_before = torch.get_rng_state()

    def first(seed: int, stream: str, n: int = 3) -> list[torch.Tensor]:
        it = digits.batches(seed, stream, 16)
        return [next(it)[1] for _ in range(n)]

    same = zip(first(1, "a"), first(1, "a"), strict=True)
    other_stream = zip(first(1, "a"), first(1, "b"), strict=True)
    other_seed = zip(first(1, "a"), first(2, "a"), strict=True)

    assert all(torch.equal(x, y) for x, y in same)
    assert not all(torch.equal(x, y) for x, y in other_stream)
    assert not all(torch.equal(x, y) for x, y in other_seed)
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_charlm_streams_differ() -> None:
    task = load_task("charlm")

    a = next(task.batches(0, "a", 4))[0]
    a2 = next(task.batches(0, "a", 4))[0]
    b = next(task.batches(0, "b", 4))[0]

    assert torch.equal(a, a2)
    assert not torch.equal(a, b)


# --- params --------------------------------------------------------------------------------


def test_schema_and_hash() -> None:
    m1 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    m2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    m3 = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))

    assert schema_of(m1) == [
        ("0.weight", (3, 4), "float32", "param"),
        ("0.bias", (3,), "float32", "param"),
        ("1.weight", (2, 3), "float32", "param"),
        ("1.bias", (2,), "float32", "param"),
    ]
    assert schema_hash(m1) == schema_hash(m2)
    assert schema_hash(m1) != schema_hash(m3)
    assert len(schema_hash(m1)) == 64


def test_flatten_assign_round_trip() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    flat = torch.arange(param_count(model), dtype=torch.float32)

    assign_flat_state(model, flat)
    out = flatten_state(model)

    assert out.dtype == torch.float32 and out.dim() == 1
    assert torch.equal(out, flat)
    assert torch.equal(model[0].bias.detach(), torch.tensor([12.0, 13.0, 14.0]))
    out += 1  # a copy: the model is not aliased
    assert torch.equal(flatten_state(model), flat)
    with pytest.raises(ValueError):
        assign_flat_state(model, flat[:-1])
    with pytest.raises(ValueError):
        assign_flat_state(model, flat.view(1, -1))


# --- InnerTrainer --------------------------------------------------------------------------


def test_run_inner_learns_and_returns_pseudo_gradient(digits: Task) -> None:
    trainer = InnerTrainer(digits, seed=0, stream_id="p0", batch_size=32, inner_lr=1e-3)
    theta0 = trainer.initial_params()
    seen: list[tuple[int, float]] = []

    before = trainer.evaluate(theta0)
    result = trainer.run_inner(theta0, 300, on_step=lambda i, loss: seen.append((i, loss)))
    trained = flatten_state(trainer._model)
    after = trainer.evaluate(theta0 - result.delta)

    assert not result.nonfinite
    assert result.steps == 300 and result.samples == 300 * 32
    assert [i for i, _ in seen] == list(range(300))
    assert result.lr == 1e-3  # constant schedule, no warm-up
    assert math.isclose(result.mean_loss, sum(v for _, v in seen) / 300, rel_tol=1e-9)
    assert torch.equal(result.delta, theta0 - trained)
    assert after["loss"] < before["loss"] - 1.0
    assert after["accuracy"] > 0.8
    # evaluate() must not disturb the training model.
    assert torch.equal(flatten_state(trainer._model), trained)
    assert torch.equal(trainer.initial_params(), theta0)


def test_initial_params_and_schema_shared_by_peers(digits: Task) -> None:
    a = InnerTrainer(digits, seed=5, stream_id="a", batch_size=8, inner_lr=1e-3)
    b = InnerTrainer(digits, seed=5, stream_id="b", batch_size=8, inner_lr=1e-3)

    assert torch.equal(a.initial_params(), b.initial_params())
    assert a.schema_hash() == b.schema_hash() == schema_hash(init_model(digits, 0))
    # Different streams: different local results from the same start.
    da = a.run_inner(a.initial_params(), 3).delta
    db = b.run_inner(b.initial_params(), 3).delta
    assert not torch.equal(da, db)


def test_should_stop_ends_early(digits: Task) -> None:
    trainer = InnerTrainer(digits, seed=0, stream_id="p", batch_size=8, inner_lr=1e-3)
    calls = iter(range(100))

    result = trainer.run_inner(trainer.initial_params(), 50, should_stop=lambda: next(calls) >= 4)

    assert result.steps == 4 and result.samples == 32
    assert not result.nonfinite


def test_nonfinite_loss_is_reported() -> None:
    trainer = InnerTrainer(NanTask(), seed=0, stream_id="p", batch_size=4, inner_lr=1e-3)

    result = trainer.run_inner(trainer.initial_params(), 10)

    assert result.nonfinite
    assert result.steps == 2


def test_huge_lr_is_nonfinite(digits: Task) -> None:
    trainer = InnerTrainer(digits, seed=0, stream_id="p", batch_size=32, inner_lr=1e30)

    result = trainer.run_inner(trainer.initial_params(), 50)

    assert result.nonfinite


def test_wrong_param_length_raises(digits: Task) -> None:
    trainer = InnerTrainer(digits, seed=0, stream_id="p", batch_size=8, inner_lr=1e-3)

    with pytest.raises(ValueError):
        trainer.run_inner(torch.zeros(3), 1)
    with pytest.raises(ValueError):
        trainer.evaluate(torch.zeros(3))


def test_inner_state_round_trip(digits: Task) -> None:
    a = InnerTrainer(digits, seed=0, stream_id="p", batch_size=16, inner_lr=1e-3)
    b = InnerTrainer(digits, seed=0, stream_id="p", batch_size=16, inner_lr=1e-3)
    theta = a.initial_params()
    a.run_inner(theta, 5)
    b.run_inner(theta, 5)  # same stream position as a

    state = a.inner_state_dict()
    fresh = InnerTrainer(digits, seed=0, stream_id="q", batch_size=16, inner_lr=1e-3)
    fresh.load_inner_state_dict(state)

    names = [n for n, *_ in schema_of(init_model(digits, 0))]
    assert set(state) == {f"{n}/{k}" for n in names for k in ("step", "exp_avg", "exp_avg_sq")}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    for key, value in fresh.inner_state_dict().items():
        assert torch.equal(value, state[key]), key
    # b continues with a's optimizer state restored: identical to a continuing.
    b.load_inner_state_dict(state)
    assert torch.equal(a.run_inner(theta, 3).delta, b.run_inner(theta, 3).delta)
    with pytest.raises(StateError):
        fresh.load_inner_state_dict({"nope/exp_avg": torch.zeros(1)})
    with pytest.raises(StateError):
        fresh.load_inner_state_dict({"0.weight/exp_avg": torch.zeros(2, 2)})


def test_evaluate_is_fast_for_builtins(digits: Task) -> None:
    import time

    for task in (digits, load_task("charlm")):
        trainer = InnerTrainer(task, seed=0, stream_id="p", batch_size=4, inner_lr=1e-3)
        theta = trainer.initial_params()
        trainer.evaluate(theta)
        start = time.perf_counter()
        trainer.evaluate(theta)
        assert time.perf_counter() - start < 0.5
