"""Write docs/results/full_cifar10.md from a completed `kedro run --env full`.

Everything on the page is read from the run's own outputs, found through its run manifest
(data/runs/): the setup, the figures the visualize pipeline drew (copied next to the page),
the claim verdicts (plain and class-stratified orderings, the controls' gate, the attribution),
the calibration figures, the best and worst batches, the run's time (from the manifest and the
training histories) and its disk use (every file the run wrote). The section between the
`conclusion` markers is written by hand and kept as it is when the page is regenerated;
everything else is replaced. The paper's fixed-order procedure has its own page,
docs/results/full_cifar10_fixed_order.md.

Run:  .venv/bin/python scripts/full_results_page.py [--run-id ID] [--env full] [--page PATH] [--project DIR]

``--project``: the checkout whose ``data/`` holds the run (default: this one), e.g. a worktree
that ran it on a frozen commit; the page and its figures are written here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))

from best_minibatch.analysis.statistics import claim_answers  # noqa: E402
from best_minibatch.services.run_manifest import Manifest, ManifestStore  # noqa: E402

PAGE = PROJECT_ROOT / "docs" / "results" / "full_cifar10.md"
FIGURES = PAGE.with_suffix("")  # docs/results/full_cifar10/
#: The checkout whose data/ holds the run (``--project``).
RUN_ROOT = PROJECT_ROOT
BEGIN, END = "<!-- conclusion: written by hand, kept on regeneration -->", "<!-- end of conclusion -->"


def batch_order(manifest: Manifest) -> str:
    """The run's ``gradient_training.batch_order`` (runs from before the parameter trained in the fixed order;
    runs from before it defaulted to shuffled record it)."""
    return str(manifest.parameters.get("gradient_training", {}).get("batch_order", "fixed"))


def completed_full_run(run_id: str | None, order: str = "fixed", env: str = "full") -> Manifest:
    """The named run's manifest, or the last completed run of environment ``env`` with that batch order."""
    store = ManifestStore(RUN_ROOT / "data" / "runs" / "run_manifest.json")
    if run_id is not None:
        manifest = store.read(run_id)
    else:
        manifest = store.last_completed({i: m for i, m in store.all().items()
                                         if (m.env or "base") == env and batch_order(m) == order})
    if manifest is None:
        command = f"kedro run --env {env} --params gradient_training.batch_order={order}"
        raise SystemExit(f"No {'run ' + run_id if run_id else f'completed run of --env {env} in the {order} order'} "
                         f"under {RUN_ROOT / 'data' / 'runs'}. Run `{command}` first (it resumes where it stopped).")
    return manifest


def dataset_file(manifest: Manifest, name: str) -> Path:
    """The file of ``name``'s version in the run's state (a versioned dataset: <path>/<version>/<file name>)."""
    entry = manifest.datasets[name]
    path = RUN_ROOT / entry.path
    return path / entry.version / path.name


def table(manifest: Manifest, name: str) -> pd.DataFrame:
    return pd.read_parquet(dataset_file(manifest, name))


def markdown(frame: pd.DataFrame, columns: dict[str, str], digits: int = 3) -> str:
    """A Markdown table of ``columns`` (name -> title), numbers to ``digits`` significant decimals."""
    def cell(value) -> str:
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "no"
        if isinstance(value, (int, np.integer)):
            return f"{value:,}"
        if isinstance(value, (float, np.floating)):
            return "" if pd.isna(value) else (f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}")
        return str(value).replace("|", "\\|")

    present = {c: t for c, t in columns.items() if c in frame}
    lines = ["| " + " | ".join(t.replace("|", "\\|") for t in present.values()) + " |", "|" + "---|" * len(present)]
    for i in range(len(frame)):
        lines.append("| " + " | ".join(cell(frame[c].iat[i]) for c in present) + " |")
    return "\n".join(lines)


def copy_figures(manifest: Manifest, group: str, root: Path = FIGURES) -> list[Path]:
    """The PNG files of one figure group, copied under ``root``/<group>/ (default docs/results/full_cifar10/)."""
    source = dataset_file(manifest, f"figures_{group}_png")  # a folder: <path>/<version>/png/
    target = root / group
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    copied = []
    for png in sorted(source.glob("*.png")):
        shutil.copy2(png, target / png.name)
        copied.append(target / png.name)
    if not copied:
        raise SystemExit(f"No PNG figures in {source}: did the run's visualize pipeline finish?")
    return copied


def image_links(paths: list[Path], alt: str, page: Path = PAGE) -> str:
    return "\n\n".join(f"![{alt}: {p.stem}]({p.relative_to(page.parent).as_posix()})" for p in paths)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def disk_use(manifest: Manifest, histories: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Bytes this run left on disk, by kind: its dataset versions, spilled gradients, checkpoints."""
    rows = []
    by_layer: dict[str, int] = {}
    for name, entry in manifest.datasets.items():
        if entry.run != manifest.run_id:
            continue
        file = dataset_file(manifest, name)
        size = folder_bytes(file) if file.is_dir() else (file.stat().st_size if file.exists() else 0)
        layer = Path(entry.path).parts[1] if len(Path(entry.path).parts) > 1 else entry.path
        by_layer[layer] = by_layer.get(layer, 0) + size
    for layer, size in sorted(by_layer.items()):
        rows.append({"what": f"versioned outputs in data/{layer}", "bytes": size})
    params = manifest.parameters.get("gradient_training", {})
    run_names = sorted({str(name) for h in histories.values() if "run_name" in h for name in h["run_name"].unique()})
    gradients = RUN_ROOT / str(params.get("gradients_dir", "data/07_model_output/gradients"))
    checkpoints = RUN_ROOT / str(params.get("checkpoint_dir", "data/06_models/checkpoints"))
    if run_names:
        rows.append({"what": f"spilled gradients ({len(run_names)} runs)",
                     "bytes": sum(folder_bytes(gradients / n) for n in run_names)})
        rows.append({"what": "checkpoints (the newest kept per run)",
                     "bytes": sum(folder_bytes(checkpoints / n) for n in run_names)})
    frame = pd.DataFrame(rows)
    frame.loc[len(frame)] = {"what": "total", "bytes": int(frame["bytes"].sum())}
    frame["size"] = [f"{b / 2**20:,.1f} MiB" for b in frame["bytes"]]
    return frame


def answer_table(claims: pd.DataFrame) -> pd.DataFrame:
    """The analysis' answer table (plain, composition held fixed, stratified, attribution), rank-biserial in brackets."""
    table = claim_answers(claims)

    def reading(verdict: str, effect: float) -> str:
        return f"{verdict} ({effect:+.2f})" if pd.notna(effect) else verdict

    return table.assign(
        claim=table["claim_id"],
        plain=[reading(v, e) for v, e in zip(table["plain"], table["plain_rank_biserial"])],
        stratified=[reading(v, e) for v, e in zip(table["stratified"], table["stratified_rank_biserial"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", help="a run id under data/runs/ (default: the newest completed run of --env)")
    parser.add_argument("--env", default="full", help="the environment whose newest completed run is read")
    parser.add_argument("--page", type=Path, default=PAGE, help="where to write the page (figures beside it)")
    parser.add_argument("--model-choice", type=Path, default=PROJECT_ROOT / "docs/results/full_cifar10_model_choice.json")
    parser.add_argument("--calibration", type=Path, default=PROJECT_ROOT / "docs/results/calibration.json")
    parser.add_argument("--project", type=Path, default=PROJECT_ROOT,
                        help="the checkout whose data/ holds the run (default: this one)")
    args = parser.parse_args()
    global RUN_ROOT
    RUN_ROOT = args.project.resolve()
    os.chdir(RUN_ROOT)
    page, figures_root = args.page.resolve(), args.page.resolve().with_suffix("")
    manifest = completed_full_run(args.run_id, order="shuffled", env=args.env)
    params = manifest.parameters

    status = table(manifest, "ordering_status")
    trained = [o for o, s in zip(status["ordering"], status["status"]) if s == "ok"]
    histories = {o: table(manifest, f"{o}.training_history") for o in trained}
    claims = table(manifest, "claim_verdicts")
    position = table(manifest, "position_effects")
    best_worst = table(manifest, "best_worst_batches")
    assignments = table(manifest, "intensity.batch_assignments")
    image_index = table(manifest, "image_index")
    n_train, n_test = int((image_index["split"] == "train").sum()), int((image_index["split"] == "test").sum())
    model = torch.load(dataset_file(manifest, "intensity.trained_model"), weights_only=True)
    first_seed = min(int(key.split("/")[0].split("=")[1]) for key in model)
    n_params = sum(t.numel() for key, t in model.items() if key.startswith(f"seed={first_seed}/")
                   and not key.endswith(("running_mean", "running_var", "num_batches_tracked")))

    started = datetime.fromisoformat(manifest.started)
    finished = datetime.fromisoformat(manifest.finished)
    training = pd.concat(histories.values())
    seconds = training.groupby(["ordering", "seed"])["seconds"].sum().unstack("seed")
    recipe = params["training"]
    options = recipe["model"].get(recipe["model"]["name"], {})
    width = "(" + ", ".join(f"{k} {v}" for k, v in options.items()) + ")" if options else ""
    n_batches = int(assignments["batch"].nunique())
    batch_size = int(assignments.groupby("batch").size().max())
    final = training[training["epoch"] == training["epoch"].max()]
    seeds = params["gradient_training"]["seeds"]
    sort = params["sort_batches"]
    n_classes = int(image_index["label"].nunique())
    base, remainder = divmod(batch_size, n_classes)
    per_class = f"{base} images" if not remainder else f"{base} or {base + 1} images ({remainder} classes get a {base + 1}th)"

    def figures(group: str) -> list[Path]:
        return copy_figures(manifest, group, figures_root)

    out = [
        "# All of CIFAR-10 at the paper's batch geometry: the designed comparison",
        "",
        f"Run `{manifest.run_id}` of `kedro run --env {args.env}` ([conf/{args.env}](../../conf/{args.env})): "
        f"{manifest.command or 'kedro run --env ' + args.env}. This page is written by "
        "`.venv/bin/python scripts/full_results_page.py` from that run's outputs; the last section is written by hand. "
        "The paper's own procedure (fixed batch order, plain orderings only) is on "
        "[full_cifar10_fixed_order.md](full_cifar10_fixed_order.md).",
        "",
        "## Setup",
        "",
        f"- **Data:** {n_train:,} training and {n_test:,} test images read from "
        f"`{params['ingest_cifar']['source']['path']}`; each ordering cut into **{n_batches} batches of "
        f"{batch_size}** ({len(assignments):,} images used per ordering); the test images evaluated after every epoch.",
        f"- **Orderings** ({len(trained)}): every metric plain (the paper's batches) and class-stratified (every batch "
        f"{per_class} of each of the {n_classes} classes), and the random control of each kind; "
        f"status: {', '.join(f'{o} {s}' for o, s in zip(status['ordering'], status['status']))}.",
        f"- **Batch order:** `{batch_order(manifest)}`: the same fixed batches in a fresh seeded order every epoch, so "
        "a batch's rank is not its place in the epoch.",
        f"- **Model:** {recipe['model']['name']} {width} ({n_params:,} parameters), SGD momentum "
        f"{recipe['momentum']}, weight decay {recipe['weight_decay']}, augmentation "
        f"{'on' if recipe['augment'] else 'off'}, {recipe['cpu_threads']} CPU threads.",
        "- **Phases:** " + ", ".join(f"{p['epochs']} epochs at lr {p['lr']:g}" for p in recipe["phases"])
        + f" ({sum(p['epochs'] for p in recipe['phases'])} epochs; the paper: 3 x 50 with DPN92).",
        f"- **Seeds:** {seeds}: each ordering trained once per seed ({len(trained) * len(seeds)} trainings); a "
        f"metric's batches are the same in every seed, each control trains its own random batching per seed "
        f"(`sort_batches.control_batchings: {sort.get('control_batchings', 1)}`).",
        f"- **Same-parameter null:** R = {params['gradient_training']['null_batches']} random batches of "
        f"{batch_size} per epoch, probed at the same epoch-start parameters against the same full gradient; the noise "
        "scale is pooled over each phase's epochs and seeds (docs/analysis.md).",
        "",
        "## Time and disk",
        "",
        f"- **Wall clock of the whole run:** {(finished - started).total_seconds() / 3600:.2f} h "
        f"({started:%Y-%m-%d %H:%M} to {finished:%Y-%m-%d %H:%M} UTC), every pipeline from ingestion to the report"
        " (a run interrupted by the end of a session and resumed counts the time between, too).",
        "- **Training (sum of epoch times, per ordering and seed), seconds:**",
        "",
        markdown(seconds.reset_index().rename(columns=lambda c: f"seed {c}" if isinstance(c, (int,)) else c),
                 {"ordering": "ordering", **{f"seed {s}": f"seed {s}" for s in seconds.columns}}, 0),
        "",
        f"Total training: {seconds.to_numpy().sum() / 3600:.2f} h; mean {training['seconds'].mean():.1f} s per "
        "probed epoch (training pass, probe of every batch, null batches, test evaluation, checkpoint).",
        "",
        markdown(disk_use(manifest, histories), {"what": "what", "size": "size"}),
        "",
        "## Training curves",
        "",
        "Final epoch, mean over seeds: " + ", ".join(
            f"{o} {final[final['ordering'] == o]['test_accuracy'].mean():.3f}" for o in trained) + " test accuracy.",
        "",
        image_links(figures("training_curves"), "training curves", page),
        "",
        "## The paper's claims: plain against class-stratified",
        "",
        "Each claim per metric and phase, in the plain ordering, with the class composition held fixed by regression "
        "(Freedman-Lane, plain only) and in the class-stratified ordering. In brackets: the rank-biserial correlation "
        "of group vs rest (negative: the group is closer to the full gradient). **Attribution**: *metric* when the "
        "stratified ordering has a verdict; *class mix* when only the plain one does (no effect detected with class "
        "held fixed, at the power below); *not assessed* when a reading is gated by its control. One Holm family "
        "over every p-value the verdicts read; supported only when every seed agrees (docs/analysis.md).",
        "",
        markdown(answer_table(claims), {"claim": "claim", "metric": "metric", "phase": "phase",
                                        "plain": "plain ordering", "adjusted": "plain, composition held fixed",
                                        "stratified": "stratified ordering", "attribution": "attribution"}),
        "",
        "Every row with its numbers (the control's own verdict is the gate):",
        "",
        markdown(claims, {"claim_id": "claim", "ordering": "ordering", "phase": "phase",
                          "rank_biserial": "rank-biserial", "p_holm": "p (Holm)", "difference": "mean difference (z)",
                          "ratio_difference": "difference (noise ratio)", "seed_differences": "per seed",
                          "seeds_agreeing": "seeds agreeing", "control_verdict": "control's verdict",
                          "verdict": "verdict", "adjusted_difference": "coefficient, composition fixed (z)",
                          "composition_r2": "R^2 group ~ composition", "adjusted_p_holm": "p (Holm), adjusted",
                          "adjusted_verdict": "verdict, composition fixed"}),
        "",
    ]
    if args.calibration.exists():
        calibration = json.loads(args.calibration.read_text())
        null = pd.DataFrame([r for r in calibration["results"] if r["kind"] == "null"])
        power = pd.DataFrame([r for r in calibration["results"] if r["kind"].startswith("power")])
        out += [
            "### What these tests can see: calibration and power",
            "",
            "`.venv/bin/python scripts/calibration.py --worlds 40 --full-worlds 12 --json docs/results/calibration.json` "
            "(docs/analysis.md, \"Calibration and power\"): the claim family under a null (every metric random) and a "
            "planted shift of intensity's upper quartile in phase 1, in simulated worlds of this geometry.",
            "",
            markdown(null, {"geometry": "geometry", "batch_order": "order", "worlds": "worlds",
                            "raw_rows": "rows with raw p < 0.05",
                            "final_rows": "rows with a final verdict", "final_worlds": "families with any verdict"}),
            "",
            markdown(power, {"geometry": "geometry", "kind": "planted", "worlds": "worlds",
                             "stratified": "stratified: supported",
                             "plain": "plain: supported", "plain_adjusted": "plain, composition fixed: supported"}),
            "",
        ]
    out += [
        "## Heat maps (paper style)",
        "",
        f"One per ordering, seed means: {n_batches} batches across (in ascending metric order), epochs down, one "
        "panel per phase; top row distance to the full gradient, bottom row noise units. A control's batch k is "
        "another random batch in every seed.",
        "",
        image_links(figures("distance_heatmaps"), "heat map", page),
        "",
        "## Distance by rank, against the null band",
        "",
        "Each metric's per-batch phase-mean distance against batch rank (dashed: class-stratified). The band is the "
        "2.5-97.5 percentile range of the plain random control's per-batch phase means.",
        "",
        image_links(figures("distance_by_rank"), "distance by rank", page),
        "",
        "## Place in the epoch",
        "",
        "Within-epoch Spearman correlation of a batch's distance with its rank and with its place in the previous "
        "epoch, and the rank given the place; the standard error takes the batching as the unit (a metric has one "
        "batching: none).",
        "",
        markdown(position, {"ordering": "ordering", "phase": "phase", "rank_spearman": "rho(rank)",
                            "previous_position_spearman": "rho(place in previous epoch)",
                            "previous_position_se": "se", "rank_given_position_spearman": "rho(rank | place)",
                            "n_units": "seed-epochs", "n_batchings": "batchings"}, 2),
        "",
        "## Best and worst batches",
        "",
        "The best and the worst batch of every ordering and phase by mean noise units (all "
        f"{int(best_worst['rank'].max())} per side: table `best_worst_batches`), and their images.",
        "",
        markdown(best_worst[best_worst["rank"] == 1], {"ordering": "ordering", "phase": "phase", "kind": "kind",
                                                       "batch": "batch", "noise_z_mean": "mean z",
                                                       "distance_mean": "mean distance", "metric_mean": "metric mean",
                                                       "class_entropy": "class entropy"}),
        "",
        image_links(figures("batch_images"), "batch images", page),
        "",
    ]
    kept = ""
    if page.exists() and BEGIN in (text := page.read_text()):
        kept = text[text.index(BEGIN): text.index(END) + len(END)]
    out += ["## The answer at this geometry", "",
            kept or f"{BEGIN}\n(to be written from the tables above)\n{END}", ""]
    page.write_text("\n".join(out))
    print(f"wrote {page} and {sum(1 for _ in figures_root.rglob('*.png'))} figures under {figures_root}")


if __name__ == "__main__":
    main()
