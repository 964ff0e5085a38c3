"""Side-by-side benchmarks of the peer daemon against its anchors (see bench/README.md).

Every entry point is ``python -m bench.<name>`` with ``--json`` for one machine-readable object.
Every process started here sets ``torch.set_num_threads(1)`` and is killed in a ``finally``.
"""
