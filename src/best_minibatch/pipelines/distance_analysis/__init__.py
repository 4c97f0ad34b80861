"""``distance_analysis``: noise units, the paper's claims as tests, confounds, best and worst batches."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
