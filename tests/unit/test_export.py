"""`peer export --state-dir`: the checkpoint as a file the task's model loads strictly, and the
bad inputs (no checkpoint, another model, an existing --out left alone). Real files, no sockets."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peer.cli import main
from peer.sync.state import GlobalState, checkpoint_metadata, write_checkpoint
from peer.trainer import InnerTrainer, flatten_state, schema_hash
from peer.trainer.task import init_model
from tests.tasks.bn_digits import BNDigitsTask

TASK = "tests.tasks.bn_digits:BNDigitsTask"


@pytest.fixture(scope="module")
def trained() -> tuple[BNDigitsTask, GlobalState]:
    torch.set_num_threads(1)
    task = BNDigitsTask()
    trainer = InnerTrainer(task, seed=0, stream_id="a", batch_size=32, inner_lr=1e-3)
    theta0 = trainer.initial_params()
    local = theta0 - trainer.run_inner(theta0, 5).delta
    return task, GlobalState(12, local, torch.zeros_like(local))


def _checkpoint(state_dir, state: GlobalState, task: BNDigitsTask) -> None:
    meta = {"run_id": "r1", "task": TASK, "schema_hash": schema_hash(init_model(task, 0))}
    write_checkpoint(state_dir / "checkpoint.safetensors", state, meta)


def _export(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *argv])
    return exit_info.value.code


def test_export_from_a_state_dir_loads_strictly_into_the_task_model(tmp_path, trained, capsys):
    task, state = trained
    _checkpoint(tmp_path, state, task)
    out = tmp_path / "model.safetensors"

    code = _export("--state-dir", str(tmp_path), "--out", str(out))
    model = task.build_model()
    model.load_state_dict(load_file(str(out)), strict=True)

    assert code == 0 and "exported round 12" in capsys.readouterr().out
    assert torch.equal(flatten_state(model), state.params)
    meta = checkpoint_metadata(out.read_bytes())
    assert meta["round"] == "12" and meta["run_id"] == "r1" and meta["task"] == TASK
    assert meta["global_hash"] == state.global_hash


@pytest.mark.parametrize("case", ["no_checkpoint", "another_model", "no_source", "peer_and_dir"])
def test_bad_export_input_is_one_line_exit_2_and_leaves_out_alone(tmp_path, trained, capsys, case):
    task, state = trained
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    if case != "no_checkpoint":
        _checkpoint(state_dir, state, task)
    argv = {"no_checkpoint": ["--state-dir", str(state_dir)],
            "another_model": ["--state-dir", str(state_dir), "--task", "digits"],
            "no_source": [],
            "peer_and_dir": ["127.0.0.1:1", "--state-dir", str(state_dir)]}[case]

    code = _export(*argv, "--out", str(out))
    err = capsys.readouterr().err.strip()

    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("peer: error: ")
    assert {"no_checkpoint": "no checkpoint in", "another_model": "does not match checkpoint",
            "no_source": "exactly one source", "peer_and_dir": "exactly one source"}[case] in err
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "state"]


def test_tied_weights_are_state_once_and_exported_as_save_model_does(tmp_path):
    from safetensors.torch import load_model

    from peer.export import save_model_file
    from peer.trainer import assign_flat_state, state_layout

    def tied() -> torch.nn.Module:
        model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
        model[1].weight = model[0].weight
        return model

    model = tied()
    layout = state_layout(model)
    flat = torch.arange(layout.numel, dtype=torch.float32)
    assign_flat_state(model, flat)
    out = tmp_path / "tied.safetensors"

    save_model_file(model, out, {"round": "1"})
    fresh = tied()
    _, unexpected = load_model(fresh, str(out), strict=True)

    assert layout.names == ("0.weight",) and layout.numel == 15
    assert not unexpected and torch.equal(fresh[0].weight, flat.view(5, 3))
    assert fresh[1].weight is fresh[0].weight
    assert len(load_file(str(out))) == 1  # stored once
