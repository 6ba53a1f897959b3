"""What is learned from finished runs: failures, Grad-CAM, comparisons, plots, report."""

import time


def log(message: str) -> None:
    """A progress line of the analysis, timestamped."""
    print(f"[analysis {time.strftime('%H:%M:%S')}] {message}", flush=True)
