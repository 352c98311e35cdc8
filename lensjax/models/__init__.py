"""Flax NNX modules, one file per model family."""
