"""``ingest_cifar``: a raw CIFAR-style dataset becomes an index table and uint8 image tensors."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
