"""Studies: one command each, measuring one question on the real model (``python -m benchmarks.studies.NAME``)."""
