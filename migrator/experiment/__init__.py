"""Convergence experiments: grids of real migrations, the classic pre-copy model, plots.

- ``model``: the pre-copy model as pure functions (``predict``, ``rounds_to_converge``, ...);
- ``grid``: cells and the preset grids; ``run``: executing them; ``results``: rows, CSV, JSON;
- ``compare``: the tracker comparison (guest slowdown); ``plots`` and ``summary``: PNG and tables;
- ``cli``: ``migrator experiment`` (and ``scripts/experiment.py``).
"""
