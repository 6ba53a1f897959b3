"""Bench part 5: the time to generate every CIFAR-10-C corrupted set (19 corruptions x 5 severities) for the trial-end
test's default 1,000 images, per corruption and in total (target: at most 30 s on the 2-core development machine)."""
from __future__ import annotations

import time

TARGET_S = 30.0


def bench_corruptions(n: int) -> float:
    from data_zoo.sources import synthetic
    from stress.corruptions import BENCHMARK, CORRUPTIONS, SEVERITIES, corrupt

    x = synthetic(n_train=10, n_test=n).test_x
    print(f"\n5. corruption generation: every corrupted set for {n} images (19 corruptions x 5 severities, one process)")
    times = {}
    for name in sorted(CORRUPTIONS):
        start = time.perf_counter()
        for severity in SEVERITIES:
            corrupt(x, name, severity)
        times[name] = time.perf_counter() - start
    for name, seconds in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"   {name:<20}{seconds:>7.2f} s{'' if name in BENCHMARK else '   (extra)'}")
    total = sum(times.values())
    print(f"   {'total':<20}{total:>7.2f} s   (target <= {TARGET_S:.0f} s for 1,000 images: {'met' if total <= TARGET_S * n / 1000 else 'NOT met'})", flush=True)
    return total
