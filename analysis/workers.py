"""Runs analysed side by side in spawned processes, each with its share of the cores: much of a run's analysis
(figures, JSON, Grad-CAM's small batches) is single-threaded Python, which one process cannot spread over cores."""
from __future__ import annotations

import os
import time
from pathlib import Path

from analysis import log
from analysis.failures import RunAnalysis, RunSettings, analyse_run
from analysis.runs import ImageCache, RunRecord

RUNS_PER_WORKER = 8


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def analyse_runs(runs: list[RunRecord], images: ImageCache, out: Path, settings: RunSettings, workers: int | None = None) -> list[RunAnalysis]:
    """``analyse_run`` for every run, in run order. With several workers (default: one per usable core, but one per
    RUNS_PER_WORKER runs at most: a worker's start costs seconds of imports) the runs go to spawned processes, each with
    its share of the cores as torch threads: much of a run's analysis (figures, JSON, Grad-CAM's small batches) is
    single-threaded Python, which one process cannot spread over cores."""
    workers = min(len(runs), workers or min(usable_cores(), max(1, len(runs) // RUNS_PER_WORKER)))
    done: dict[int, RunAnalysis] = {}

    def finished(i: int, analysis: RunAnalysis) -> None:
        done[i] = analysis
        log(f"run {len(done)}/{len(runs)} {analysis.run.name}: {len(analysis.failures)} failures above {settings.threshold}")

    if workers <= 1:
        for i, run in enumerate(runs):
            finished(i, analyse_run(run, images, out, settings))
        return [done[i] for i in range(len(runs))]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    log(f"analysing {len(runs)} runs in {workers} processes")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_setup,
                             initargs=(max(1, usable_cores() // workers), os.getpid())) as pool:
        heaviest_first = sorted(range(len(runs)), key=lambda i: -model_size(runs[i]))  # no large model left alone at the end
        futures = {pool.submit(_analyse_in_worker, runs[i], out, settings): i for i in heaviest_first}
        for future in as_completed(futures):
            result = future.result()
            runs[futures[future]].reader.absorb(result.run.reader)  # what the worker read, in the analysis's counts
            finished(futures[future], result)
    return [done[i] for i in range(len(runs))]


def model_size(run: RunRecord) -> int:
    """Parameters of the run's model (built on the meta device: no memory, no time), a proxy for its analysis's cost."""
    import torch

    from model_zoo import create_model

    with torch.device("meta"):
        model = create_model(run.config["arch"], len(run.predictions.classes), **run.config.get("model", {}))
    return sum(p.numel() for p in model.parameters())


_WORKER_IMAGES: ImageCache | None = None  # a worker's own decode of the test images, shared by the runs it analyses


def _worker_setup(threads: int, parent: int) -> None:
    import threading

    import torch

    global _WORKER_IMAGES
    torch.set_num_threads(threads)
    _WORKER_IMAGES = ImageCache()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A worker whose analysis was killed (Ctrl-C, SIGKILL) stops within a second instead of finishing its run alone."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _analyse_in_worker(run: RunRecord, *args) -> RunAnalysis:
    run.reader.reset()  # the copy that came with the run: what it reads here goes back with the result, to be absorbed
    return analyse_run(run, _WORKER_IMAGES, *args)
