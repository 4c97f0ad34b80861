"""``sort_batches``: each metric's ordering of the training set cut into fixed mini-batches (one namespace per metric)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
