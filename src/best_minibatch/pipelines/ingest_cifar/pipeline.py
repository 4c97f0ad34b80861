"""Wiring of ``ingest_cifar``."""

from kedro.pipeline import Pipeline, node

from .nodes import ingest_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                ingest_images,
                inputs="params:ingest_cifar.source",
                outputs=["image_index", "train_images", "test_images"],
                name="ingest_images",
            )
        ]
    )
