"""Benchmark harness: Spec-Bench figures for our pipeline side by side with in-process peers."""
