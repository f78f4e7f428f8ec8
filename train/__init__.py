"""ControlNet training on build shards (trainer, data), the paper's sampler, and the
controllability metrics with the sudden-convergence detector."""
