"""``batch_selection``: do the "best" mini-batches train faster than shuffling? (Kedro-free)

``config`` (parameters), ``pools`` (the static policies' batches), ``policies``
(the eight policies), ``experiment`` (every run through the shared training loop),
``statistics`` (tests against shuffle and the report). The names below are the
package's public API.
"""

from best_minibatch.selection.config import (
    ADVICE_GROUPS,
    BASELINE,
    CLASS_BALANCED,
    CLOSENESS_MEASURES,
    CONTROL,
    CURVE_COLUMNS,
    POLICIES,
    POOL_COLUMNS,
    RESULT_COLUMNS,
    SelectionConfig,
    SelectionConfigError,
    SelectionDataError,
    kept_count,
    policy_rng,
)
from best_minibatch.selection.experiment import (
    ExperimentResults,
    ImageData,
    describe_setup,
    probe_distances,
    run_experiment,
    train_with_policy,
    upfront_selection_seconds,
)
from best_minibatch.selection.policies import (
    BatchPolicy,
    ClassBalancedPolicy,
    FixedOrderPolicy,
    OraclePolicy,
    PoolCycler,
    PoolPolicy,
    ShufflePolicy,
    build_policy,
    class_balanced_partition,
    closest_batches,
    random_partition,
)
from best_minibatch.selection.pools import (
    advice_mask,
    fixed_order_pool,
    learned_pool,
    ordering_batches,
    paper_advice_pool,
    pools_by_phase,
    random_subset_pools,
    rank_positions,
    stratified_validation_split,
    subset_ids,
)

__all__ = [
    "ADVICE_GROUPS", "BASELINE", "CLASS_BALANCED", "CLOSENESS_MEASURES", "CONTROL", "CURVE_COLUMNS", "POLICIES",
    "POOL_COLUMNS", "RESULT_COLUMNS", "BatchPolicy", "ClassBalancedPolicy", "ExperimentResults",
    "FixedOrderPolicy", "ImageData", "OraclePolicy", "PoolCycler", "PoolPolicy", "SelectionConfig",
    "SelectionConfigError", "SelectionDataError", "ShufflePolicy", "advice_mask", "build_policy",
    "class_balanced_partition", "closest_batches", "describe_setup", "fixed_order_pool", "kept_count",
    "learned_pool", "ordering_batches", "paper_advice_pool", "policy_rng", "pools_by_phase", "probe_distances",
    "random_partition", "random_subset_pools", "rank_positions", "run_experiment", "stratified_validation_split",
    "subset_ids", "train_with_policy", "upfront_selection_seconds",
]
