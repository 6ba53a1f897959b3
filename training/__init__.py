"""The pieces of one trial's training loop (``trainable.py`` tells the story): device, precision, optimiser, epochs."""
