"""The model's whole state (parameters and buffers) as the flat global vector; the outer step on
it; the inner learning-rate schedule; bf16 autocast. Pure logic: no sockets."""

from __future__ import annotations

import math

import pytest
import torch

from peer.errors import ConfigError
from peer.sync.outer import outer_step
from peer.trainer import InnerTrainer, LRSchedule, assign_flat_state, flatten_state, schema_hash, state_layout
from peer.trainer.params import param_count
from tests.tasks.bn_digits import BNDigitsTask


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.bn = torch.nn.BatchNorm2d(2)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)
        self.head = torch.nn.Linear(2, 2)


@pytest.fixture(scope="module")
def bn_task() -> BNDigitsTask:
    torch.set_num_threads(1)
    return BNDigitsTask()


def test_layout_holds_parameters_then_persistent_buffers() -> None:
    model = _Net()

    layout = state_layout(model)

    assert layout.names == ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.weight", "head.bias",
                            "bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
    assert layout.param_numel == param_count(model) == 18 + 2 + 2 + 2 + 4 + 2
    assert layout.numel == layout.param_numel + 2 + 2 + 1
    assert layout.int_slices == ((layout.numel - 1, layout.numel),)
    assert set(layout.names) == set(model.state_dict())  # the non-persistent buffer is not state


def test_flat_state_round_trip_includes_buffers_and_rounds_integers() -> None:
    model = _Net()
    flat = torch.arange(state_layout(model).numel, dtype=torch.float32)
    flat[-1] = 6.6  # num_batches_tracked travels as float

    assign_flat_state(model, flat)

    assert torch.equal(model.bn.running_var, torch.tensor([flat[-3].item(), flat[-2].item()]))
    assert model.bn.num_batches_tracked.dtype == torch.int64 and int(model.bn.num_batches_tracked) == 7
    back = flatten_state(model)
    assert torch.equal(back[:-1], flat[:-1]) and back[-1].item() == 7.0
    with pytest.raises(ValueError, match="parameters and buffers"):
        assign_flat_state(model, flat[:-1])


def test_schema_hash_covers_buffers() -> None:
    a, b = _Net(), _Net()
    b.bn = torch.nn.BatchNorm2d(2, track_running_stats=False)  # same parameters, no buffers

    assert state_layout(a).param_numel == state_layout(b).param_numel
    assert schema_hash(a) != schema_hash(b)


def test_outer_step_averages_buffers_without_momentum_and_rounds_integer_buffers() -> None:
    # 3 parameters, 2 float buffers, 1 integer buffer
    params = torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0, 10.0])
    grad = torch.tensor([0.1, 0.1, 0.1, 0.25, -0.5, -9.6])  # avg(theta - local)
    buf = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])

    new, new_buf = outer_step(params, grad, buf, lr=0.7, momentum=0.9, param_numel=3, int_slices=((5, 6),))
    ref_p, ref_buf = outer_step(params[:3], grad[:3], buf[:3], lr=0.7, momentum=0.9)

    assert torch.equal(new[:3], ref_p) and torch.equal(new_buf[:3], ref_buf)
    assert torch.equal(new[3:5], torch.tensor([0.25, 1.5]))  # theta - g: the members' mean
    assert new[5].item() == 20.0  # 19.6 rounded
    assert torch.equal(new_buf[3:], torch.zeros(3))
    with pytest.raises(ValueError):
        outer_step(params, grad, buf, lr=0.7, momentum=0.9, param_numel=3, int_slices=((1, 2),))


def test_trainer_trains_and_evaluates_with_the_buffers_of_the_global_state(bn_task) -> None:
    trainer = InnerTrainer(bn_task, seed=0, stream_id="a", batch_size=32, inner_lr=1e-3)
    layout = trainer.layout
    theta0 = trainer.initial_params()

    result = trainer.run_inner(theta0, 5)
    local = theta0 - result.delta
    stats = slice(layout.param_numel, layout.numel - 1)
    changed = local.clone()
    changed[stats] = theta0[stats]  # the trained parameters with the initial statistics

    assert not torch.equal(local[stats], theta0[stats])  # BatchNorm statistics moved
    assert int(trainer._model[1].num_batches_tracked) == 5  # counted within the phase ...
    assert result.delta[-1].item() == 0.0  # ... but an integer buffer sends no change
    assert trainer.evaluate(local)["loss"] != trainer.evaluate(changed)["loss"]


def test_schedule_values() -> None:
    const = LRSchedule("constant", warmup_steps=4)
    cos = LRSchedule("cosine", warmup_steps=10, total_steps=110)

    assert [const.factor(s) for s in (0, 1, 3, 4, 10_000)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert cos.factor(9) == 1.0
    assert cos.factor(10) == 1.0 and math.isclose(cos.factor(60), 0.5) and cos.factor(110) == 0.0
    assert cos.factor(500) == 0.0
    assert LRSchedule().factor(0) == 1.0
    with pytest.raises(ConfigError, match="total_steps > warmup_steps"):
        LRSchedule("cosine", warmup_steps=10, total_steps=10)
    with pytest.raises(ConfigError, match="constant, cosine"):
        LRSchedule("linear")


def test_inner_phase_uses_the_schedule_at_the_global_step(bn_task) -> None:
    schedule = LRSchedule("cosine", warmup_steps=5, total_steps=100)
    trainer = InnerTrainer(bn_task, seed=0, stream_id="a", batch_size=32, inner_lr=1e-2, schedule=schedule)
    seen: list[float] = []

    result = trainer.run_inner(trainer.initial_params(), 3, first_step=40,
                               on_step=lambda i, loss: seen.append(trainer._optimizer.param_groups[0]["lr"]))

    assert seen == [1e-2 * schedule.factor(s) for s in (40, 41, 42)]
    assert result.lr == seen[-1]


def test_a_task_may_supply_its_own_schedule(bn_task) -> None:
    class Stepped(BNDigitsTask):
        def inner_lr(self, step, base_lr, schedule):
            return base_lr / (1 + step // 10)

    task = Stepped.__new__(Stepped)
    task.__dict__.update(bn_task.__dict__)
    trainer = InnerTrainer(task, seed=0, stream_id="a", batch_size=32, inner_lr=1e-2)

    assert trainer.run_inner(trainer.initial_params(), 1, first_step=25).lr == 1e-2 / 3


def test_bf16_autocast_trains_on_cpu_and_keeps_the_state_float32(bn_task) -> None:
    fp32 = InnerTrainer(bn_task, seed=0, stream_id="a", batch_size=32, inner_lr=1e-3)
    bf16 = InnerTrainer(bn_task, seed=0, stream_id="a", batch_size=32, inner_lr=1e-3, precision="bf16")

    a = fp32.run_inner(fp32.initial_params(), 3)
    b = bf16.run_inner(bf16.initial_params(), 3)

    assert not b.nonfinite and b.delta.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in bf16._model.parameters())
    assert not torch.equal(a.delta, b.delta)  # the forward pass really ran in bfloat16
    assert torch.allclose(a.delta, b.delta, atol=5e-3)
    with pytest.raises(ConfigError, match="precision"):
        InnerTrainer(bn_task, seed=0, stream_id="a", batch_size=32, inner_lr=1e-3, precision="fp16")


def test_a_cuda_device_that_is_not_there_is_a_clear_error() -> None:
    from peer.trainer import resolve_device

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        assert resolve_device(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")
        with pytest.raises(ConfigError, match=f"only {count} CUDA devices"):
            resolve_device(f"cuda:{count}")
    else:
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="bad device"):
        resolve_device("cuda:x")
