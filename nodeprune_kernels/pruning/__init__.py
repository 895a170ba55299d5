"""The pruning run: a circuit from a model and a task (objectives, sparsity, the loop, evaluation, reports)."""
