"""Reports over run dirs: accuracy plots (vs remaining weights, FLOPs or measured throughput), tables
(every round; rounds as columns per sweep), a CSV of every round, and the lineage tree of branches.

runs.py reads run dirs, lineage.py draws the tree, series.py aggregates seeds, xaxes.py / plot.py
draw, tables.py and sweep.py tabulate; report_runs.py is the command line.
"""
