"""Benchmarks: ``python -m benchmarks run --suite {gemm,e2e,compress,all}`` and the standalone scripts beside it."""
