"""One small, model-agnostic training loop (accelerate) used by every model."""
