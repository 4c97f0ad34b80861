"""Nodes of ``sort_batches``."""

from __future__ import annotations

from typing import Any

import pandas as pd

from best_minibatch.batches.batching import batch_size_from_params, sort_into_batches, tie_seed_from_params


def sort_scores_into_batches(
    metric: str, image_scores: pd.DataFrame, image_index: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cut ``metric``'s ascending ordering (ties in seeded random order) into full batches; assignments, summary."""
    return sort_into_batches(image_scores, image_index, metric, batch_size_from_params(params),
                             tie_seed_from_params(params))
