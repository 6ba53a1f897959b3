"""What is learned from finished runs: failures, Grad-CAM, comparisons, plots, report."""
