"""What is learned from finished runs: failures, Grad-CAM, comparisons, plots, report."""

import time

# Defaults the command line shows in its --help: here, so that --help and a bad flag answer at once (the modules that
# use them import torch, grad-cam and matplotlib: 8-10 s on a 2-core machine).
GALLERY_CLASSES = ("cat", "dog", "bird", "airplane", "ship")  # seed 004's gallery
ROAD_IMAGES = 32  # seeded test images per run on which Grad-CAM's ROAD faithfulness is measured


def log(message: str) -> None:
    """A progress line of the analysis, timestamped."""
    print(f"[analysis {time.strftime('%H:%M:%S')}] {message}", flush=True)
