"""Nodes of ``sort_batches``."""

from __future__ import annotations

from typing import Any

import pandas as pd

from best_minibatch.batches.batching import SortBatchesConfig, empty_batch_tables, sort_into_batches
from best_minibatch.batches.orderings import ordering_of


def sort_scores_into_batches(
    ordering: str, image_scores: pd.DataFrame, image_index: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cut the ordering's metric (ascending, ties in seeded random order) into full batches, plain or
    class-stratified; a stratified ordering with ``sort_batches.stratify: false`` gets empty tables."""
    config = SortBatchesConfig.from_params(params)
    spec = ordering_of(ordering)
    if spec.stratified and not config.stratify:
        return empty_batch_tables(image_index, spec.metric, ordering)
    return sort_into_batches(image_scores, image_index, spec.metric, config.batch_size, config.tie_seed,
                             stratified=spec.stratified, batchings=config.control_batchings)
