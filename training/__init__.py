"""Training: data pipeline, architecture, training loop and evaluation plots."""
