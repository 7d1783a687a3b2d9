"""The benchmarks, run from the repository's root as `python -m bench.<name>` (`make bench` runs them all);
what each measures and how is in its own docstring, the figures in docs/benchmarks.md."""
