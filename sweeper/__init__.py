"""sweeper: Ray-distributed hyperparameter sweeps from one YAML manifest."""

__version__ = "0.1.0"
