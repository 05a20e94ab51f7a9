"""Per-layer numerics comparison: `python -m tools.numerics` (see __main__.py).

sides.py (what a side is, its config), weights.py (the weights both sides read), capture.py
(a side's tensors, with forward hooks), compare.py (the table), job.py (the whole comparison,
in one process or a process per side), worker.py (one side in its own process).
"""
