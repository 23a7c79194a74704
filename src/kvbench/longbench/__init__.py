"""LongBench (v1) and LongBench-E: tasks, data, prompts and the official metrics."""
