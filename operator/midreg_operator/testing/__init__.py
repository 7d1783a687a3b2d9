"""Helpers for tests and benchmarks: a real control plane on loopback."""
