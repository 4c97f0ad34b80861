"""Calibration and power of the verdicts: the analysis run on simulated distances with known truth.

Knows nothing of Kedro. :func:`simulate_run` turns real batchings (``sort_batches``'
tables, any metric, e.g. one whose scores are random) into every table the analysis
reads, with distances made of known parts, in noise units of a random batch:

* a **class-composition** term: ``class_sd`` times a standardised weighted sum of the
  batch's class counts around ``m / C`` (weights drawn once per simulated world, so
  *which* classes a batch holds matters, as it does in real runs);
* a **persistent batch** term (``batch_sd``), the same in every epoch and seed that
  trains the batch (seeds sharing a batching are not independent);
* a **place-in-the-epoch** term: a batch trained at step ``p`` of the previous epoch is
  closer by ``recency x p / (K - 1)`` (the last steps shaped ``theta_e`` most);
* independent **epoch noise** (``epoch_noise``), and an optional **planted** offset per
  ordering and phase.

The ``R`` same-parameter null batches of each epoch are random batches: a fresh
composition and batch term, the mean place term. :func:`verdict_rates` runs the project's
own analysis (:mod:`best_minibatch.analysis.statistics`) on many simulated worlds and
counts verdicts; ``scripts/calibration.py`` prints the figures docs/analysis.md quotes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from best_minibatch.analysis import statistics
from best_minibatch.gradient_training import epoch_order


@dataclass(frozen=True)
class SimulatedWorld:
    """The sizes and effect sizes of a simulated run (noise units of a random batch's epoch noise)."""

    n_seeds: int = 2
    phase_epochs: tuple[int, ...] = (2, 2, 2)
    null_batches: int = 10
    class_sd: float = 1.0
    batch_sd: float = 0.5
    recency: float = 1.0
    epoch_noise: float = 1.0

    def between_batch_sd(self, class_varies: bool) -> float:
        """The standard deviation over batches of a batch's mean over a phase and the seeds, without place
        effects: the unit of a planted shift."""
        epochs = self.phase_epochs[0] * self.n_seeds
        return float(np.sqrt(self.batch_sd**2 + (self.class_sd**2 if class_varies else 0.0)
                             + self.epoch_noise**2 / epochs))


def _class_term(counts: np.ndarray, weights: np.ndarray, batch_size: int) -> np.ndarray:
    """Standardised ``sum_c w_c (n_c - m / C)`` of each row of class counts (unit variance over random batches)."""
    n_classes = counts.shape[1]
    p = np.full(n_classes, 1.0 / n_classes)
    variance = batch_size * (float((weights**2 * p).sum()) - float((weights * p).sum()) ** 2)
    return (counts - batch_size / n_classes) @ weights / np.sqrt(variance)


def simulate_run(batchings: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]], labels: np.ndarray,
                 world: SimulatedWorld, batch_order: str, rng: np.random.Generator,
                 planted: Mapping[tuple[str, int], np.ndarray] | None = None) -> dict[str, dict]:
    """Every analysis input of a simulated run: ``{ordering: {table kind: table}}``.

    ``batchings[ordering]`` is ``(batch_assignments, batch_summary)`` as ``sort_batches``
    writes them (a control with one batching per seed); ``labels`` the class of every
    training image, indexed by ``image_id``. ``planted[(ordering, phase)]``: per-batch
    offsets added in that phase.
    """
    planted = planted or {}
    n_classes = int(labels.max()) + 1
    weights = rng.normal(size=n_classes)
    epochs = [(phase, epoch) for phase, count in enumerate(world.phase_epochs, start=1) for epoch in range(count)]
    scale = {e: 0.5 ** (phase - 1) * (1 + 0.1 * e) for e, (phase, _) in enumerate(epochs, start=1)}
    run = {}
    for ordering, (assignments, summary) in batchings.items():
        count_columns = [c for c in summary.columns if c.startswith("class_count_")]
        batch_size = int(assignments.groupby(["batching", "batch"]).size().iloc[0])
        n_batchings = int(summary["batching"].nunique())
        persistent = {b: rng.normal(0, world.batch_sd, size=int((summary["batching"] == b).sum()))
                      for b in range(n_batchings)}
        distance_rows, null_rows = [], []
        for seed in range(world.n_seeds):
            batching = seed if n_batchings > 1 else 0
            counts = summary.loc[summary["batching"] == batching, count_columns].to_numpy(np.float64)
            k = len(counts)
            fixed_part = world.class_sd * _class_term(counts, weights, batch_size) + persistent[batching]
            previous = None
            for e, (phase, _) in enumerate(epochs, start=1):
                order = epoch_order(batch_order, seed, e, k)
                position = np.empty(k, dtype=np.int64)
                position[order] = np.arange(k)
                place = np.zeros(k) if previous is None else -world.recency * previous / max(k - 1, 1)
                z = fixed_part + place + rng.normal(0, world.epoch_noise, size=k)
                z = z + planted.get((ordering, phase), 0.0)
                distance = scale[e] * (1 + 0.05 * z)
                distance_rows.append(pd.DataFrame({
                    "ordering": ordering, "seed": seed, "batching": batching, "epoch": e, "phase": phase,
                    "learning_rate": 0.1 ** phase, "batch": np.arange(k), "distance": distance,
                    "cosine_similarity": 0.5, "relative_distance": distance, "position": position,
                }))
                random_counts = rng.multinomial(batch_size, np.full(n_classes, 1.0 / n_classes),
                                                size=world.null_batches).astype(np.float64)
                null_z = (world.class_sd * _class_term(random_counts, weights, batch_size)
                          + rng.normal(0, world.batch_sd, size=world.null_batches)
                          + (0.0 if previous is None else -world.recency / 2)
                          + rng.normal(0, world.epoch_noise, size=world.null_batches))
                null_rows.append(pd.DataFrame({
                    "ordering": ordering, "seed": seed, "epoch": e, "phase": phase,
                    "draw": np.arange(world.null_batches), "distance": scale[e] * (1 + 0.05 * null_z),
                }))
                previous = position
        run[ordering] = {
            "gradient_distances": pd.concat(distance_rows, ignore_index=True),
            "null_distances": pd.concat(null_rows, ignore_index=True),
            "batch_summary": summary,
            "metric_status": {"metric": ordering, "status": "ok", "reason": None},
        }
    return run


def analyse(run: Mapping[str, Mapping], n_permutations: int, alpha: float = 0.05, seed: int = 0,
            null_ordering: str = "random") -> pd.DataFrame:
    """The project's analysis of a simulated run, as the pipeline runs it; returns ``claim_verdicts``."""
    distances = {o: t["gradient_distances"] for o, t in run.items()}
    noise_units = statistics.noise_unit_distances(distances, null_ordering,
                                                  {o: t["null_distances"] for o, t in run.items()})
    summaries = {o: t["batch_summary"] for o, t in run.items()}
    batch_stats = statistics.batch_phase_statistics(noise_units, summaries)
    by_seed = statistics.batch_phase_statistics_by_seed(noise_units, summaries)
    status = statistics.ordering_status_table({o: t["metric_status"] for o, t in run.items()}, distances)
    comparisons = statistics.compare_batch_groups(batch_stats, n_permutations=n_permutations, seed=seed,
                                                  batch_stats_by_seed=by_seed)
    return statistics.claim_verdicts(comparisons, status, alpha=alpha, null_ordering=null_ordering)


DECIDED = (statistics.SUPPORTED, statistics.CONTRADICTED)


def verdict_rates(claim_tables: list[pd.DataFrame]) -> dict[str, float]:
    """Over simulated worlds: the share of rows and of worlds (families) with a decided verdict, per column.

    ``raw_rows``: rows whose primary test is significant before Holm (``p_value < alpha``):
    the per-test level. ``test_rows`` / ``test_worlds``: the test's verdict (Holm, seed rule)
    before the fixed-order label and the gate; ``final_rows`` / ``final_worlds``: the final
    reading (``verdict``), likewise for ``adjusted``.
    """
    def share(column: str, per_world: bool) -> float:
        flags = [table[column].isin(DECIDED) for table in claim_tables]
        return float(np.mean([f.any() for f in flags]) if per_world else np.mean(np.concatenate(flags)))

    raw = np.concatenate([(t["p_value"] < t["alpha"]).to_numpy() for t in claim_tables])
    return {
        "worlds": len(claim_tables), "rows": int(sum(len(t) for t in claim_tables)),
        "raw_rows": float(raw.mean()),
        "test_rows": share("test_verdict", False), "test_worlds": share("test_verdict", True),
        "final_rows": share("verdict", False), "final_worlds": share("verdict", True),
        "adjusted_final_rows": share("adjusted_verdict", False),
        "adjusted_final_worlds": share("adjusted_verdict", True),
    }


def world_seed(*names: object) -> np.random.Generator:
    """A generator fixed by the names (a world's draw, its order, its effect)."""
    return np.random.default_rng(zlib.crc32("/".join(map(str, names)).encode()))


#: The orderings of a simulated run: the paper's four metrics (the claims' family) and the control, each plain
#: and stratified.
SIMULATED_METRICS = ("intensity", "color", "edges", "perceptual", "random")


def null_batchings(image_index: pd.DataFrame, metric: str, batch_size: int, draw: int,
                   score: Callable[[str, int], pd.DataFrame], n_seeds: int) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Batchings of a null world: every ordering of :data:`SIMULATED_METRICS` cut from ``metric``'s scores.

    ``score(name, draw)`` returns the score table (``image_id``, ``score``) standing in for
    metric ``name`` in world ``draw`` (random scores: every "metric" is a null); ``metric``
    is the registered metric the cut uses (its sort columns), so the batches are cut by the
    project's own ``sort_into_batches``, plain and stratified, the control with one batching
    per seed.
    """
    from best_minibatch.batches.batching import sort_into_batches
    from best_minibatch.batches.orderings import ordering_name

    out = {}
    for name in SIMULATED_METRICS:
        scores = score(name, draw)
        for stratified in (False, True):
            assignments, summary = sort_into_batches(scores, image_index, "random" if name == "random" else metric,
                                                     batch_size, draw, stratified=stratified, batchings=n_seeds)
            ordering = ordering_name(name, stratified)
            out[ordering] = (assignments.assign(ordering=ordering), summary.assign(ordering=ordering))
    return out


def planted_shift(world: SimulatedWorld, orderings: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]],
                  metric: str, shift_sd: float, phase: int = 1) -> dict[tuple[str, int], np.ndarray]:
    """A shift of ``shift_sd`` between-batch standard deviations (:meth:`SimulatedWorld.between_batch_sd`) that
    brings ``metric``'s upper-quartile batches closer in ``phase``, in its plain and its stratified ordering."""
    from best_minibatch.batches.orderings import ordering_name

    effects = {}
    for stratified in (False, True):
        ordering = ordering_name(metric, stratified)
        k = int((orderings[ordering][1]["batching"] == 0).sum())
        upper = statistics.group_mask((np.arange(k) + 0.5) / k, statistics.UPPER_QUARTILE)
        effects[(ordering, phase)] = np.where(upper, -shift_sd * world.between_batch_sd(not stratified), 0.0)
    return effects
