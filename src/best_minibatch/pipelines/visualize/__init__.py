"""``visualize``: the paper's heat maps and more as versioned figures, and the run's HTML report."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
