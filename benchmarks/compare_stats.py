"""Time the statistics of `pickrank compare`: N bootstrap resamples over P prompts x S systems (median of runs).

    PYTHONPATH=. python benchmarks/compare_stats.py [--prompts 5000] [--systems 4] [--samples 1] [--bootstrap 10000]

The target: 10,000 resamples over 5,000 prompts x 4 systems in under 2 s on the 2-core dev machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from pickrank.analysis.comparison import ScoreTable, compare_systems


def synthetic(prompts: int, systems: int, samples: int, seed: int = 0) -> ScoreTable:
    """Scores like PickScore's (about 21 +- 1), each system a little better than the one before."""
    rng = np.random.default_rng(seed)
    base = rng.normal(21.0, 1.0, size=(prompts, 1))
    return ScoreTable.from_scores({f"sys{s}": (base + 0.1 * s + rng.normal(0, 0.5, (prompts, samples))).tolist()
                                   for s in range(systems)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=5000)
    ap.add_argument("--systems", type=int, default=4)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--bootstrap", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--all-pairs", action="store_true")
    ap.add_argument("--best-of-n", action="store_true")
    a = ap.parse_args()
    table = synthetic(a.prompts, a.systems, a.samples)
    times = []
    for _ in range(a.runs):
        start = time.perf_counter()
        result = compare_systems(table, bootstrap=a.bootstrap, seed=0, all_pairs=a.all_pairs, best_of_n=a.best_of_n)
        times.append(time.perf_counter() - start)
    print(f"compare stats: {a.bootstrap} resamples x {a.prompts} prompts x {a.systems} systems "
          f"({a.samples} sample(s), {len(result.pairs)} pairs): median {statistics.median(times):.2f} s "
          f"of {a.runs} (min {min(times):.2f} s)")


if __name__ == "__main__":
    main()
