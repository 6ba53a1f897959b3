"""The overhead benchmark's reference: one trial with no Ray and no MLflow, in a worker of a plain process pool."""
from __future__ import annotations

import time


def plain_trial(args: tuple[dict, int]) -> float:
    """One trial through ``trainable.fit`` with no Ray and no MLflow; its wall time."""
    from config.schema import build
    from config.settings import TrialConfig
    from tracking import TrialRun
    from trainable import fit

    start = time.perf_counter()
    trial, threads = args
    problems: list = []
    cfg = build(TrialConfig, trial, "", problems)
    fit(cfg, TrialRun(), lambda values, state: None, threads=threads)
    return time.perf_counter() - start
