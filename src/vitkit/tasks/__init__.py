"""Training and inference tasks: losses, mask annealing, post-processing, metrics."""
