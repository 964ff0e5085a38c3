"""UCI 8x8 handwritten digits (the copy bundled with scikit-learn): the default, tiny task.

Data: 1797 samples of 64 pixels with values 0..16, 10 classes. The last 297 samples are the
held-out split (as in scikit-learn's classic example); the first 1500 are the training split.

``--data PATH``: a CSV file (optionally ``.gz``) in the layout of scikit-learn's
``digits.csv.gz``: one sample per row, 64 pixel values in 0..16 then the integer label 0..9.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import torch

from peer.errors import TaskError
from peer.trainer.task import TaskDefaults
from peer.trainer.tasks._classify import ArrayClassificationTask, mlp

_HELD_OUT = 297


def _sklearn_digits_path() -> str | None:
    # Locate sklearn's bundled CSV without importing sklearn (which costs ~1 s of start-up).
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            return path
    return None


def _read_csv(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, ValueError) as exc:
        raise TaskError(f"digits: cannot read {path}: {exc}") from exc
    if data.shape[1] != 65 or data.shape[0] < 2:
        raise TaskError(
            f"digits: {path} must have rows of 64 pixel values and a label, got shape {data.shape}"
        )
    return data


class DigitsTask(ArrayClassificationTask):
    """MLP 64-128-10 (9,610 parameters) on 8x8 digits; ~0.55 ms per step (batch 32, one
    thread, data included), evaluate() under 1 ms."""

    name = "digits"
    # Tiny and fast: H=40 steps of batch 32 is ~20 ms of compute per round, so CI runs with
    # several peers on 2 cores stay quick. AdamW lr 1e-3 is the usual rate for a small MLP.
    # A one-process DiLoCo simulation (K=3, H=40, 20 rounds) reached 0.90 held-out accuracy
    # by round 10 with outer lr 0.5, 0.7 or 1.0 alike; the held-out loss then rises (1500
    # training samples: every round is ~2.5 epochs), least with 0.5 (0.85 vs 1.07 vs 1.38 at
    # round 20), so 0.5 with the DiLoCo momentum 0.9.
    defaults = TaskDefaults(inner_steps=40, batch_size=32, inner_lr=1e-3, outer_lr=0.5)

    def __init__(self, data_path: str | None = None) -> None:
        super().__init__(data_path)
        path = data_path if data_path is not None else _sklearn_digits_path()
        if path is None:
            raise TaskError(
                "digits: needs scikit-learn's bundled digits data "
                "(pip install scikit-learn) or --data PATH to a digits CSV"
            )
        if not os.path.isfile(path):
            raise TaskError(f"digits: data file {path} does not exist")
        data = _read_csv(path)
        x = torch.from_numpy(data[:, :64] / 16.0)
        y = torch.from_numpy(data[:, 64].astype(np.int64))
        if int(y.min()) < 0 or int(y.max()) > 9:
            raise TaskError(f"digits: labels in {path} must be 0..9")
        held_out = min(_HELD_OUT, x.shape[0] // 5) if data_path is not None else _HELD_OUT
        self.train_x, self.train_y = x[:-held_out].contiguous(), y[:-held_out].contiguous()
        self.test_x, self.test_y = x[-held_out:].contiguous(), y[-held_out:].contiguous()

    def build_model(self) -> torch.nn.Module:
        return mlp([64, 128, 10])
