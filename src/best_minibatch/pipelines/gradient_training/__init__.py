"""``gradient_training``: train on each ordering's fixed mini-batches while probing every batch's gradient."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
