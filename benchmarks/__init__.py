"""pgq's benchmark (``python benchmarks/run.py``); a package so workers can import ``benchmarks.tasks``."""
