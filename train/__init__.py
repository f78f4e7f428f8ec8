"""ControlNet trainer, sampler and metrics: not built yet (see the issues)."""
