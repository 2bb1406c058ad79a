"""Benchmarks of the real services: backlog drain, baseline, end to end, latency, memory."""
