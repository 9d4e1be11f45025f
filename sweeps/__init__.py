"""Sweeps: a grid of runner commands, each cell in its own run dir under <root>/<name>/.

grid.py (pure expansion and names) -> plan.py (validation with the runner's parser) -> record.py
(sweep.json, jobs.json) -> cells.py (finished / interrupted / new / locked from plain files) ->
executors.py (registry) with local.py (process pool) and slurm.py + job.py (submitit) -> summary.py.
"""
