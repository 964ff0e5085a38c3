"""Your own training loop, trained together with other peers: a small `transformers` model and
``peer.Swarm``.

Needs Hugging Face ``transformers`` (not a dependency of peer):

    pip install transformers          # or: pip install 'peer[examples]'

The model is a tiny GPT-2 built from a config (nothing is downloaded), trained as a byte-level
language model on a text file (default: this repository's README.md). The loop is an ordinary
PyTorch loop; the only additions are the ``with peer.Swarm(...)`` line and ``swarm.step()``
after each optimizer step. Every H steps the peers average their progress (one DiLoCo round),
and the model then holds the new global parameters.

Once per run, make the run's credentials and copy the directory to every machine:

    peer keys new --run-id lab1 --out lab1-keys

Then on each machine (the same command; peers find each other by mDNS):

    python examples/hf_swarm.py --run-id lab1 --credentials lab1-keys

Two on one machine (each needs its own ports and state directory):

    python examples/hf_swarm.py --run-id lab1 --credentials lab1-keys --listen 127.0.0.1:0 \\
        --metrics-port 0 --interface 127.0.0.1 --state-dir /tmp/hf-a &
    python examples/hf_swarm.py --run-id lab1 --credentials lab1-keys --listen 127.0.0.1:0 \\
        --metrics-port 0 --interface 127.0.0.1 --state-dir /tmp/hf-b

Every peer must build the same model (same config and ``--seed``): the handshake refuses a peer
whose parameter names, shapes or dtypes differ. ``peer run`` peers of the same run can join too,
with a task whose model has the same schema.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import peer

try:
    from transformers import GPT2Config, GPT2LMHeadModel
except ImportError:  # pragma: no cover (an optional dependency)
    sys.exit("this example needs transformers: pip install transformers")


def byte_batches(text: bytes, seq_len: int, batch_size: int, seed: int):
    """Endless batches of ``seq_len`` consecutive bytes at random offsets (this peer's own order)."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    if data.numel() <= seq_len:
        sys.exit(f"the text has {data.numel()} bytes; it needs more than --seq-len {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=gen)
        yield torch.stack([data[s:s + seq_len] for s in starts.tolist()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--credentials", help="the run's credentials directory (peer keys new)")
    ap.add_argument("--insecure", action="store_true", help="no TLS: a trusted network only")
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps of this peer")
    ap.add_argument("--inner-steps", type=int, default=50, help="H: steps per round")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="model init: the same on every peer")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    ap.add_argument("--listen", default=None, help="gRPC host:port (default 0.0.0.0:7070)")
    ap.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default 9470)")
    ap.add_argument("--interface", default=None, help="IPv4 address for mDNS (default: all)")
    ap.add_argument("--peer", action="append", default=None, help="static peer host:port (repeatable)")
    ap.add_argument("--state-dir", default=None, help="key and checkpoints (default ./peer-state/RUN)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # peer logs through `logging`: a line per round, join and leave, as `peer run` does.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    torch.manual_seed(args.seed)  # the same initial parameters on every peer
    config = GPT2Config(vocab_size=256, n_positions=args.seq_len, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    # Only the settings given here; the rest come from peer's defaults, PEER_* variables or a
    # config file (config="peer.toml"), as for `peer run`.
    given = {"listen": args.listen, "metrics_port": args.metrics_port, "interfaces": args.interface,
             "peers": args.peer, "state_dir": args.state_dir, "insecure": args.insecure or None}
    settings = {name: value for name, value in given.items() if value is not None}

    with peer.Swarm(model, run_id=args.run_id, credentials=args.credentials, inner_steps=args.inner_steps,
                    **settings) as swarm:
        # The constructor returned once the model holds the run's current parameters (from a
        # donor if the others are ahead). This peer's data order comes from its peer id.
        batches = byte_batches(Path(args.text).read_bytes(), args.seq_len, args.batch_size,
                               seed=int(swarm.peer_id[:8], 16))
        for step in range(args.steps):
            batch = next(batches)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if swarm.step(samples=len(batch), loss=loss):
                print(f"step {step + 1}: round {swarm.round}, last loss {loss.item():.3f}, "
                      f"global {swarm.global_hash[:12]}", flush=True)
    # Leaving the with block left the run: the others go on without this peer.


if __name__ == "__main__":
    main()
