"""Training: data pipeline, architecture, training loop and evaluation plots."""
import vision  # noqa: F401  (its TensorFlow settings must precede keras, which training.architecture imports)
