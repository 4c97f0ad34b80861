"""Figures of the distance analysis: heat maps, seed spread, distance by batch rank, batch images, training curves.

Knows nothing of Kedro. Every function returns ``matplotlib.figure.Figure``
objects built without pyplot (no global figure state), styled with seaborn. The
tables are those of :mod:`best_minibatch.analysis.statistics` and ``docs/data_flow.md``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from best_minibatch.analysis.statistics import epoch_phase_table, phase_spans, with_seed
from best_minibatch.batches.orderings import ordering_of

#: Light = short distance, as in the paper's heat maps.
DISTANCE_CMAP = "rocket_r"
NULL_COLOR = "0.45"
#: Background of the outer 10% on each side, the "extremes" of the paper's claims.
EXTREMES_SHADE = "#f6ecd9"
STYLE = {**sns.axes_style("ticks"), "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
         "ytick.labelsize": 8, "legend.fontsize": 8, "figure.titlesize": 11}

#: Colour-bar labels (short: the colour bar of one row is about 3 inches tall).
MEASURE_LABELS = {
    "distance": "‖g_k − g_full‖",
    "noise_z": "z against random batches\nof the same epoch",
}


def ordering_colors(orderings: Sequence[str], null_ordering: str) -> dict[str, tuple | str]:
    """One colour per metric, the same in every figure, shared by its plain and stratified orderings (line
    styles tell them apart: :func:`ordering_line_style`); the null orderings are grey."""
    null_metric = ordering_of(null_ordering).metric
    metrics = list(dict.fromkeys(ordering_of(o).metric for o in orderings if ordering_of(o).metric != null_metric))
    palette = dict(zip(metrics, sns.color_palette("colorblind", max(len(metrics), 1))))
    colors: dict[str, tuple | str] = {
        o: NULL_COLOR if ordering_of(o).metric == null_metric else palette[ordering_of(o).metric] for o in orderings}
    colors[null_ordering] = NULL_COLOR
    return colors


def ordering_line_style(ordering: str) -> str:
    """Solid for a plain ordering, dashed for a class-stratified one."""
    return "--" if ordering_of(ordering).stratified else "-"


def png_bytes(figure: Figure, dpi: int = 120) -> bytes:
    """The figure rendered as PNG (its constrained layout keeps everything inside, so no tight box)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _phase_title(span: pd.Series) -> str:
    return (f"Phase {int(span['phase'])}: epochs {int(span['first_epoch'])}–{int(span['last_epoch'])}, "
            f"lr {span['learning_rate']:g}")


def _batch_axis_label(ordering: str, null_ordering: str) -> str:
    spec = ordering_of(ordering)
    kind = ", class-stratified" if spec.stratified else ""
    if spec.metric == ordering_of(null_ordering).metric:
        return f"batch index (random assignment{kind})"
    return f"batch index (ascending {spec.metric}{kind})"


# --------------------------------------------------------------------------- heat maps


HEATMAP_ROWS = (("distance", "distance"), ("noise_z", "distance in noise units"))


def _heatmap_row(figure: Figure, axes, table: pd.DataFrame, spans: pd.DataFrame, value: str, x_label: str,
                 row_name: str) -> None:
    """One row of :func:`distance_heatmap`: a panel per phase on one colour scale, and its colour bar."""
    finite = table[value].to_numpy(float)
    finite = finite[np.isfinite(finite)]
    vmin, vmax = np.percentile(finite, [1, 99]) if len(finite) else (0.0, 1.0)
    image = None
    for axis, (_, span) in zip(axes, spans.iterrows()):
        part = table[table["phase"] == span["phase"]]
        matrix = part.pivot_table(index="epoch", columns="batch", values=value, aggfunc="mean").sort_index()
        n_batches = matrix.shape[1]
        image = axis.imshow(
            matrix.to_numpy(float), aspect="auto", cmap=DISTANCE_CMAP, vmin=vmin, vmax=vmax,
            interpolation="nearest",
            extent=(-0.5, n_batches - 0.5, matrix.index.max() + 0.5, matrix.index.min() - 0.5),
        )
        axis.set_title(f"{_phase_title(span)}: {row_name}", fontsize=9)
        axis.set_xlabel(x_label)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    axes[0].set_ylabel("epoch")
    colorbar = figure.colorbar(image, ax=list(axes), extend="both", shrink=0.95, aspect=15)
    label = MEASURE_LABELS[value] + " (light = closer)"
    if value == "noise_z" and vmin < 0 < vmax:
        colorbar.ax.axhline(0.0, color="k", linewidth=1)
        label += "\nline at 0: as close as a random batch"
    colorbar.set_label(label, fontsize=7)


def distance_heatmap(noise_units: pd.DataFrame, ordering: str, null_ordering: str) -> Figure:
    """The paper's heat map of one ordering: a panel per phase, x = batch, y = epoch, light = close.

    Top row: ``distance``; bottom row: the same in noise units (``noise_z``). Each
    cell is the mean over the seeds of that epoch and batch (one seed: the run's
    value). Each row has one colour scale across phases (the 1st–99th percentile of
    the ordering's cell values over all phases, so that one outlier does not wash
    the map out; the colour bar's arrows mark clipping) and its own colour bar.
    """
    table = with_seed(noise_units[noise_units["ordering"] == ordering])
    if table.empty:
        raise ValueError(f"No distance rows for ordering '{ordering}'.")
    spans = phase_spans(epoch_phase_table(table, ordering))
    n_seeds = table["seed"].nunique()
    # One value per cell: the seed mean (what the panels show, and what the colour scale is fitted to).
    table = table.groupby(["phase", "epoch", "batch"], as_index=False)[[value for value, _ in HEATMAP_ROWS]].mean()
    x_label = _batch_axis_label(ordering, null_ordering)
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(3.6 * len(spans) + 1.4, 6.6), layout="constrained")
        axes = figure.subplots(len(HEATMAP_ROWS), len(spans), squeeze=False)
        for row, (value, row_name) in enumerate(HEATMAP_ROWS):
            _heatmap_row(figure, axes[row], table, spans, value, x_label, row_name)
        seeds = f" (mean of {n_seeds} seeds)" if n_seeds > 1 else ""
        figure.suptitle(f"{ordering} ordering: distance of each mini-batch's gradient to the full gradient{seeds}")
    return figure


def distance_heatmaps(
    noise_units: pd.DataFrame, orderings: Sequence[str], null_ordering: str
) -> dict[str, Figure]:
    """:func:`distance_heatmap` of every ordering that has distances, keyed ``heatmap_<ordering>``."""
    return {
        f"heatmap_{ordering}": distance_heatmap(noise_units, ordering, null_ordering)
        for ordering in orderings
        if (noise_units["ordering"] == ordering).any()
    }


# --------------------------------------------------------------------------- seed spread


def seed_spread(batch_stats_by_seed: pd.DataFrame, orderings: Sequence[str], null_ordering: str) -> Figure:
    """How much the per-batch picture changes with the seed: one panel per ordering (rows) and phase (columns).

    Each panel shows every seed's phase-mean noise units per batch (thin lines), their
    mean over seeds (thick line, what the claims test) and the mean ± one standard
    deviation across seeds (band); its title gives the median of that standard
    deviation over the batches. With one seed there is no spread to show: the panel
    says so and shows the seed's line.
    """
    table = with_seed(batch_stats_by_seed)
    present = [o for o in orderings if (table["ordering"] == o).any()]
    if not present:
        raise ValueError("No ordering has per-seed batch statistics to plot.")
    phases = sorted(table["phase"].unique())
    colors = ordering_colors(list(orderings), null_ordering)
    n_seeds = table["seed"].nunique()
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(3.6 * len(phases) + 0.8, 2.0 * len(present) + 1.0), layout="constrained")
        # One y scale per ordering (row): the orderings' spreads differ by an order of magnitude.
        axes = figure.subplots(len(present), len(phases), squeeze=False, sharex="col", sharey="row")
        for row, ordering in enumerate(present):
            for column, phase in enumerate(phases):
                axis = axes[row, column]
                part = table[(table["ordering"] == ordering) & (table["phase"] == phase)]
                wide = part.pivot_table(index="batch", columns="seed", values="noise_z_mean").sort_index()
                color = colors[ordering]
                for seed in wide.columns:
                    axis.plot(wide.index, wide[seed], color=color, linewidth=0.7, alpha=0.55)
                mean = wide.mean(axis=1)
                axis.plot(wide.index, mean, color=color, linewidth=1.8)
                axis.axhline(0.0, color="0.3", linewidth=0.8, linestyle=":")
                if wide.shape[1] > 1:
                    sd = wide.std(axis=1, ddof=1)
                    axis.fill_between(wide.index, mean - sd, mean + sd, color=color, alpha=0.18, linewidth=0)
                    spread = f"median sd across seeds {float(np.nanmedian(sd)):.2f} z"
                else:
                    spread = "one seed: no spread"
                axis.set_title(f"{ordering}, phase {int(phase)}: {spread}", fontsize=8)
                if row == len(present) - 1:
                    axis.set_xlabel(_batch_axis_label(ordering, null_ordering) if len(present) == 1
                                    else "batch index (in each row's ordering)")
                if column == 0:
                    axis.set_ylabel("phase-mean z")
                axis.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
                sns.despine(ax=axis)
        figure.suptitle(f"Seed spread: each seed's phase-mean distance in noise units per batch ({n_seeds} "
                        f"seed{'s' if n_seeds != 1 else ''}; thin: one seed, thick: mean, band: ± 1 sd across seeds)")
    return figure


# --------------------------------------------------------------------------- distance by rank


def distance_by_rank(batch_stats: pd.DataFrame, orderings: Sequence[str], null_ordering: str) -> Figure:
    """Per phase: each metric's per-batch mean distance against batch rank, over the random ordering's band.

    Top row: raw distance; bottom row: noise units. The band is the mean and the
    2.5–97.5 percentile range of the random ordering's per-batch phase means. Grey
    shading marks the outer 10% on each side and the dotted line the upper quartile,
    the groups of the paper's claims.
    """
    phases = sorted(batch_stats["phase"].unique())
    colors = ordering_colors(orderings, null_ordering)
    rows = (("distance_mean", "mean distance ‖g_k − g_full‖"), ("noise_z_mean", "mean distance (noise units, z)"))
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(3.8 * len(phases) + 0.6, 6.0), layout="constrained")
        axes = figure.subplots(2, len(phases), squeeze=False, sharex=True)
        noise_limits = [np.inf, -np.inf]
        handles = {}
        for column, phase in enumerate(phases):
            part = batch_stats[batch_stats["phase"] == phase]
            null = part[part["ordering"] == null_ordering]
            n_batches = int(part["batch"].max()) + 1
            for row, (value, label) in enumerate(rows):
                axis = axes[row, column]
                axis.axvspan(-0.5, 0.1 * n_batches - 0.5, color=EXTREMES_SHADE, zorder=0)
                axis.axvspan(0.9 * n_batches - 0.5, n_batches - 0.5, color=EXTREMES_SHADE, zorder=0)
                axis.axvline(0.75 * n_batches - 0.5, color="0.5", linestyle=":", linewidth=1, zorder=0)
                if len(null):
                    low, high = np.percentile(null[value].to_numpy(float), [2.5, 97.5])
                    band = axis.axhspan(low, high, color=NULL_COLOR, alpha=0.25, linewidth=0, zorder=1)
                    mean = axis.axhline(null[value].mean(), color=NULL_COLOR, linewidth=1.2, zorder=1)
                    handles["random batches: 95% range"] = band
                    handles["random batches: mean"] = mean
                for ordering in orderings:
                    if ordering == null_ordering:
                        continue
                    series = part[part["ordering"] == ordering].sort_values("batch")
                    if series.empty:
                        continue
                    (line,) = axis.plot(series["batch"], series[value], color=colors[ordering],
                                        linestyle=ordering_line_style(ordering), linewidth=1.3,
                                        marker="." if n_batches <= 60 else None, zorder=2)
                    handles[ordering] = line
                if row == 1:
                    low, high = axis.get_ylim()
                    noise_limits = [min(noise_limits[0], low), max(noise_limits[1], high)]
                    axis.set_xlabel("batch rank (ascending metric)")
                if column == 0:
                    axis.set_ylabel(label)
            span = part.iloc[0]
            axes[0, column].set_title(
                f"Phase {int(phase)}: epochs {int(span['first_epoch'])}–{int(span['last_epoch'])}, "
                f"lr {span['learning_rate']:g}"
            )
            axes[1, column].xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        for axis in axes[1]:
            axis.set_ylim(*noise_limits)
        figure.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
                      ncol=min(len(handles), 4), frameon=False)
        figure.suptitle("Distance of each batch's gradient to the full gradient, by batch rank "
                        "(dashed: class-stratified; tinted: outer 10% each side; dotted: upper-quartile boundary)")
    return figure


# --------------------------------------------------------------------------- batch images


def batch_montage(images: np.ndarray, gap: int = 1) -> np.ndarray:
    """The images (``n x H x W x 3`` uint8) tiled in a near-square grid with white gaps."""
    n, height, width, channels = images.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, channels), 255, np.uint8)
    for index in range(n):
        r, c = divmod(index, columns)
        canvas[r * (height + gap) : r * (height + gap) + height, c * (width + gap) : c * (width + gap) + width] = images[index]
    return canvas


def batch_images(
    batch: int, batch_assignments: pd.DataFrame, train_images: np.ndarray, image_rows: pd.Series
) -> np.ndarray:
    """The images of one batch in batch order; ``image_rows`` maps ``image_id`` to its row in ``train_images``."""
    members = batch_assignments[batch_assignments["batch"] == batch].sort_values("position")
    rows = image_rows.loc[members["image_id"].to_numpy()].to_numpy()
    return np.asarray(train_images)[rows]


def batch_image_grid(
    ordering: str,
    best_worst: pd.DataFrame,
    batch_assignments: pd.DataFrame,
    train_images: np.ndarray,
    image_index: pd.DataFrame,
) -> Figure:
    """Best and worst batch of each phase of one ordering: their images and their class mix.

    One row per phase; columns: best batch's images, its class counts, worst
    batch's images, its class counts. ``best_worst`` is the analysis table of
    best and worst batches (rank 1 of each kind is shown).
    """
    train = image_index[image_index["split"] == "train"]
    image_rows = pd.Series(train["row"].to_numpy(), index=train["image_id"].to_numpy())
    class_names = train.drop_duplicates("label").sort_values("label")["class_name"].tolist()
    label_of = pd.Series(train["label"].to_numpy(), index=train["image_id"].to_numpy())
    chosen = best_worst[(best_worst["ordering"] == ordering) & (best_worst["rank"] == 1)]
    phases = sorted(chosen["phase"].unique())
    shown_ids = batch_assignments.loc[batch_assignments["batch"].isin(chosen["batch"]), ["batch", "image_id"]]
    shown_counts = pd.crosstab(shown_ids["batch"], label_of.loc[shown_ids["image_id"].to_numpy()].to_numpy())
    count_limit = 1.1 * float(shown_counts.to_numpy().max()) if shown_counts.size else 1.0
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(11, 2.9 * len(phases) + 0.6), layout="constrained")
        axes = figure.subplots(len(phases), 4, squeeze=False, gridspec_kw={"width_ratios": [3, 1.6, 3, 1.6]})
        for row, phase in enumerate(phases):
            for column, kind in ((0, "best"), (2, "worst")):
                entry = chosen[(chosen["phase"] == phase) & (chosen["kind"] == kind)].iloc[0]
                batch = int(entry["batch"])
                image_axis, mix_axis = axes[row, column], axes[row, column + 1]
                image_axis.imshow(batch_montage(batch_images(batch, batch_assignments, train_images, image_rows)),
                                  interpolation="nearest")
                image_axis.set_xticks([])
                image_axis.set_yticks([])
                image_axis.set_title(
                    f"Phase {int(phase)} {kind}: batch {batch}\n"
                    f"z = {entry['noise_z_mean']:+.2f}, metric mean {entry['metric_mean']:.4g}",
                    fontsize=9,
                )
                ids = batch_assignments.loc[batch_assignments["batch"] == batch, "image_id"].to_numpy()
                counts = np.bincount(label_of.loc[ids].to_numpy(), minlength=len(class_names))
                mix_axis.barh(np.arange(len(class_names)), counts,
                              color="tab:green" if kind == "best" else "tab:red")
                mix_axis.set_yticks(np.arange(len(class_names)), class_names, fontsize=7)
                mix_axis.invert_yaxis()
                mix_axis.set_xlim(0, count_limit)  # one scale for the whole figure
                mix_axis.set_xlabel("images in batch", fontsize=8)
                mix_axis.set_title(f"class mix (entropy {entry['class_entropy']:.2f} nats)", fontsize=8)
                sns.despine(ax=mix_axis)
        figure.suptitle(f"{ordering} ordering: the batches closest to (best) and farthest from (worst) the "
                        "full gradient, by mean noise-unit distance over each phase")
    return figure


def batch_image_grids(
    best_worst: pd.DataFrame,
    assignments_by_ordering: Mapping[str, pd.DataFrame],
    train_images: np.ndarray,
    image_index: pd.DataFrame,
) -> dict[str, Figure]:
    """:func:`batch_image_grid` for every ordering that has best and worst batches (a control's first batching:
    its batch k is another batch in every seed)."""
    assignments_by_ordering = {
        ordering: (table[table["batching"] == 0] if "batching" in table else table)
        for ordering, table in assignments_by_ordering.items()}
    return {
        f"batches_{ordering}": batch_image_grid(ordering, best_worst, assignments, train_images, image_index)
        for ordering, assignments in assignments_by_ordering.items()
        if (best_worst["ordering"] == ordering).any() and len(assignments)
    }


# --------------------------------------------------------------------------- training curves


def training_curves(histories: Mapping[str, pd.DataFrame], null_ordering: str) -> Figure:
    """Loss and accuracy per epoch (train solid, test dashed) of every ordering, phase boundaries marked.

    With several seeds each line is the mean over the seeds of that epoch.
    """
    quantities = ["train_loss", "test_loss", "train_accuracy", "test_accuracy"]
    present = {o: with_seed(h).groupby(["epoch", "phase", "learning_rate"], as_index=False)[quantities].mean()
               .sort_values("epoch") for o, h in histories.items() if len(h)}
    n_seeds = max((with_seed(h)["seed"].nunique() for h in histories.values() if len(h)), default=1)
    if not present:
        raise ValueError("No ordering has a training history to plot.")
    # Every ordering its own colour here: train and test already take the two line styles.
    colors = dict(zip(present, sns.color_palette("tab20" if len(present) > 10 else "tab10", len(present))))
    reference = next(iter(present.values()))
    spans = phase_spans(epoch_phase_table(reference, "training_history"))
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(10, 3.8), layout="constrained")
        axes = figure.subplots(1, 2, squeeze=False)[0]
        for axis, quantity, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "accuracy", "accuracy")):
            for ordering, history in present.items():
                axis.plot(history["epoch"], history[f"train_{quantity}"], color=colors[ordering], linestyle="-",
                          marker="." if len(history) <= 40 else None, label=f"{ordering} (train)")
                axis.plot(history["epoch"], history[f"test_{quantity}"], color=colors[ordering], linestyle="--",
                          marker="." if len(history) <= 40 else None, label=f"{ordering} (test)")
            for _, span in spans.iloc[1:].iterrows():
                axis.axvline(span["first_epoch"] - 0.5, color="0.3", linestyle=":", linewidth=1)
            for _, span in spans.iterrows():
                phase_label = f"phase {int(span['phase'])}\nlr {span['learning_rate']:g}"
                axis.text((span["first_epoch"] + span["last_epoch"]) / 2, 1.0, phase_label,
                          transform=axis.get_xaxis_transform(), ha="center", va="bottom", fontsize=7)
            axis.set_xlabel("epoch")
            axis.set_ylabel(label)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            sns.despine(ax=axis)
        handles = [Line2D([], [], color=colors[o], linewidth=2) for o in present]
        handles += [Line2D([], [], color="k", linestyle=s) for s in ("-", "--")]
        figure.legend(handles, [*present, "train", "test"], loc="outside right center", frameon=False)
        seeds = f"; mean of {n_seeds} seeds" if n_seeds > 1 else ""
        figure.suptitle(f"Training curves of every ordering (each trains its own network on its fixed batches{seeds})")
    return figure
