"""Training: config-driven experiments, checkpoints with exact resume, tracking."""
