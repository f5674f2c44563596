"""Fused cross-entropy vs torch: time (median) and peak memory per contender.

    python benchmarks/bench_cross_entropy.py            # = python -m crossent.torch.bench
    python benchmarks/bench_cross_entropy.py ce-f32 --repeats 7 --no-memory

Writes benchmarks/results/bench.json and bench.png; see ``--help`` and
:mod:`crossent.torch.bench` for the method.
"""

from crossent.torch.bench import main

if __name__ == "__main__":
    main()
