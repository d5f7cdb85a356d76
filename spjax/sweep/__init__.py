"""Scaling-law sweeps: spec -> runs (local or SLURM) -> table -> fitted law -> plots.

spec.py (points), status.py (what is finished), runners.py (local) and slurm.py, collect.py
(CSV), table.py (reading it back), fit.py (Chinchilla approach 3), plots.py, commands.py (CLI).
"""
