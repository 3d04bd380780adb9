"""Defaults of a training run, shared by `TrainConfig`, the architecture and `cli.py train`.

Kept free of heavy imports so the CLI can show them in its help without loading scikit-learn or Keras.
"""
EPOCHS = 36
BATCH_SIZE = 32
LEARNING_RATE = 2e-3  # peak of the warm-up + cosine schedule
WIDTH = 24  # filters of the first conv stage; later stages double it (the shipped network's since 2026-12-06)
POOL = "max"  # global pooling before the head (architecture.POOLS): the shipped network's
SEED = 1337
VAL_FRACTION = 0.15
DISTIL_TEMPERATURE = 4.0  # Hinton et al.'s range (2-5): softens a confident teacher enough to show its runner-up classes
DISTIL_WEIGHT = 0.8  # share of the loss that follows the teacher; the rest follows the label-smoothed labels
