"""The benchmarks: `python bench/loss_throughput.py` (or `python -m bench.loss_throughput`),
the GPU acceptance run, the static sm_90 gate and the cost model. A package, so that its
scripts import each other as `bench.<module>`; each script run by path puts the repository
root first on `sys.path`, as `python -m` would."""
