"""Shared code of the benchmarks: the analytic model of parallel plans, timing and result records."""
