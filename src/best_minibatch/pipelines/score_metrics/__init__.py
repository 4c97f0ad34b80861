"""``score_metrics``: every registered metric scores every training image (one namespace per metric)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
