"""Task loop, evaluation, metrics, results files and checkpoints."""
