"""posttrain benchmarks: the same workload run by posttrain, TRL and a bare PyTorch loop.

``python -m bench --help`` for the options; ``python -m bench.report`` renders
``bench/results/latest.json`` to ``docs/benchmarks.md``. See docs/benchmarks.md.
"""
