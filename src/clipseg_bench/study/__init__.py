"""Benchmarking: the strategy x seed matrix, the report (tables, plots, HTML) and the demo.

Submodules are imported where they are used, so that `import clipseg_bench.study` stays cheap.
"""
