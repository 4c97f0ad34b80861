"""Write docs/results/full_cifar10.md from a completed `kedro run --env full`.

Everything on the page is read from the run's own outputs, found through its run manifest
(data/runs/): the setup, the figures the visualize pipeline drew (copied next to the page),
the claim verdicts across seeds, the class-balance confound, the best and worst batches, the
run's time (from the manifest and the training histories) and its disk use (every file the run
wrote). The section between the `conclusion` markers is written by hand and kept as it is when
the page is regenerated; everything else is replaced.

Run:  .venv/bin/python scripts/full_results_page.py [--run-id ID] [--model-choice docs/results/full_cifar10_model_choice.json]
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

from best_minibatch.run_manifest import Manifest, ManifestStore  # noqa: E402

PAGE = PROJECT_ROOT / "docs" / "results" / "full_cifar10.md"
FIGURES = PAGE.with_suffix("")  # docs/results/full_cifar10/
MANIFESTS = PROJECT_ROOT / "data" / "runs" / "run_manifest.json"
ORDERINGS = ("intensity", "color", "edges", "perceptual", "random")
BEGIN, END = "<!-- conclusion: written by hand, kept on regeneration -->", "<!-- end of conclusion -->"


def batch_order(manifest: Manifest) -> str:
    """The run's ``gradient_training.batch_order`` (runs from before the parameter trained in the fixed order)."""
    return str(manifest.parameters.get("gradient_training", {}).get("batch_order", "fixed"))


def completed_full_run(run_id: str | None, order: str = "fixed") -> Manifest:
    """The named run's manifest, or the last completed run of the `full` environment with that batch order."""
    store = ManifestStore(MANIFESTS)
    if run_id is not None:
        manifest = store.read(run_id)
    else:
        manifest = store.last_completed({i: m for i, m in store.all().items()
                                         if m.env == "full" and batch_order(m) == order})
    if manifest is None:
        command = "kedro run --env full" + ("" if order == "fixed" else f" --params gradient_training.batch_order={order}")
        raise SystemExit(f"No {'run ' + run_id if run_id else f'completed run of --env full in the {order} order'} "
                         f"under {MANIFESTS}. Run `{command}` first (it resumes where it stopped).")
    return manifest


def dataset_file(manifest: Manifest, name: str) -> Path:
    """The file of ``name``'s version in the run's state (a versioned dataset: <path>/<version>/<file name>)."""
    entry = manifest.datasets[name]
    path = PROJECT_ROOT / entry.path
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


def copy_figures(manifest: Manifest, group: str) -> list[Path]:
    """The PNG files of one figure group, copied under docs/results/full_cifar10/<group>/."""
    source = dataset_file(manifest, f"figures_{group}_png")  # a folder: <path>/<version>/png/
    target = FIGURES / group
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    copied = []
    for png in sorted(source.glob("*.png")):
        shutil.copy2(png, target / png.name)
        copied.append(target / png.name)
    if not copied:
        raise SystemExit(f"No PNG figures in {source}: did the run's visualize pipeline finish?")
    return copied


def image_links(paths: list[Path], alt: str) -> str:
    return "\n\n".join(f"![{alt}: {p.stem}]({p.relative_to(PAGE.parent).as_posix()})" for p in paths)


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
    gradients = PROJECT_ROOT / str(params.get("gradients_dir", "data/07_model_output/gradients"))
    checkpoints = PROJECT_ROOT / str(params.get("checkpoint_dir", "data/06_models/checkpoints"))
    if run_names:
        rows.append({"what": f"spilled gradients ({len(run_names)} runs)",
                     "bytes": sum(folder_bytes(gradients / n) for n in run_names)})
        rows.append({"what": "checkpoints (the newest kept per run)",
                     "bytes": sum(folder_bytes(checkpoints / n) for n in run_names)})
    frame = pd.DataFrame(rows)
    frame.loc[len(frame)] = {"what": "total", "bytes": int(frame["bytes"].sum())}
    frame["size"] = [f"{b / 2**20:,.1f} MiB" for b in frame["bytes"]]
    return frame


CONFOUND_COLUMNS = {"metric_mean": "rho(metric, distance)", "class_entropy": "rho(class entropy, distance)",
                    "metric_mean | class_entropy": "partial rho(metric, distance | class entropy)"}


def confound_table(confounds: pd.DataFrame) -> pd.DataFrame:
    """One row per ordering and phase: each correlation with its interval, bold where it excludes 0."""
    rows = []
    for (ordering, phase), part in confounds.groupby(["ordering", "phase"], sort=True):
        row = {"ordering": ordering, "phase": int(phase)}
        for _, r in part.iterrows():
            key = r["variable"] + (f" | {r['given']}" if isinstance(r["given"], str) and r["given"] else "")
            text = f"{r['spearman']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
            row[key] = f"**{text}**" if r["ci_excludes_zero"] else text
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", help="a run id under data/runs/ (default: the newest completed --env full run)")
    parser.add_argument("--model-choice", type=Path, default=PROJECT_ROOT / "docs/results/full_cifar10_model_choice.json")
    args = parser.parse_args()
    os.chdir(PROJECT_ROOT)
    manifest = completed_full_run(args.run_id)
    params = manifest.parameters

    histories = {o: table(manifest, f"{o}.training_history") for o in ORDERINGS}
    claims = table(manifest, "claim_verdicts")
    confounds = table(manifest, "confound_correlations")
    best_worst = table(manifest, "best_worst_batches")
    status = table(manifest, "ordering_status")
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

    out = [
        "# All of CIFAR-10 at the paper's batch geometry",
        "",
        f"Run `{manifest.run_id}` of `kedro run --env full` (the `full` environment, [conf/full](../../conf/full)): "
        f"{manifest.command or 'kedro run --env full'}. This page is written by "
        "`.venv/bin/python scripts/full_results_page.py` from that run's outputs; the last section is written by hand.",
        "",
        "## Setup",
        "",
        f"- **Data:** {n_train:,} training and {n_test:,} test images read from "
        f"`{params['ingest_cifar']['source']['path']}`; each metric's order cut into **{n_batches} batches of "
        f"{batch_size}** ({len(assignments):,} images used, the last {n_train - len(assignments)} of each order "
        "dropped); the test images evaluated after every epoch.",
        f"- **Orderings:** {', '.join(status['ordering'])} (status: "
        f"{', '.join(f'{o} {s}' for o, s in zip(status['ordering'], status['status']))}).",
        f"- **Model:** {recipe['model']['name']} {width} ({n_params:,} parameters), SGD momentum "
        f"{recipe['momentum']}, weight decay {recipe['weight_decay']}, augmentation "
        f"{'on' if recipe['augment'] else 'off'}, {recipe['cpu_threads']} CPU threads.",
        "- **Phases:** " + ", ".join(f"{p['epochs']} epochs at lr {p['lr']:g}" for p in recipe["phases"])
        + f" ({sum(p['epochs'] for p in recipe['phases'])} epochs; the paper: 3 x 50 with DPN92).",
        f"- **Seeds:** {params['gradient_training']['seeds']} (each ordering trained once per seed: "
        f"{len(ORDERINGS) * len(params['gradient_training']['seeds'])} trainings).",
        f"- **Same-parameter null:** R = {params['gradient_training']['null_batches']} random batches of "
        f"{batch_size} per epoch, probed at the same epoch-start parameters and measured against the same full "
        "gradient; noise units (z) are z-scores against them.",
        "",
    ]
    if args.model_choice.exists():
        choice = json.loads(args.model_choice.read_text())
        out += [
            "### Why this model: measured",
            "",
            "`.venv/bin/python scripts/full_model_choice.py --json docs/results/full_cifar10_model_choice.json` times "
            f"real probed epochs at this geometry ({choice['batches']} batches of {choice['batch_size']}, "
            f"{choice['null_batches']} null batches, test evaluation), the second of two, and multiplies by "
            f"{choice['epochs']} epochs x {choice['runs']} runs. The budget is about two hours for the whole "
            "environment on this 2-core machine; the widest model whose training fits with room for the stages "
            "around it and for a machine shared with other work was chosen.",
            "",
            markdown(pd.DataFrame(choice["candidates"]), {
                "width": "small_cnn width", "parameters": "parameters", "threads": "CPU threads",
                "epoch_seconds": "s per probed epoch", "estimated_hours": "training, hours (estimate)"}, 2),
            "",
        ]
    out += [
        "## Time and disk",
        "",
        f"- **Wall clock of the whole run:** {(finished - started).total_seconds() / 3600:.2f} h "
        f"({started:%Y-%m-%d %H:%M} to {finished:%H:%M} UTC), every pipeline from ingestion to the report.",
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
            f"{o} test accuracy {final[final['ordering'] == o]['test_accuracy'].mean():.3f}" for o in ORDERINGS) + ".",
        "",
        image_links(copy_figures(manifest, "training_curves"), "training curves"),
        "",
        "## Heat maps (paper style)",
        "",
        f"One per ordering, seed means: {n_batches} batches across (in ascending metric order), epochs down, one "
        "panel per phase; top row distance to the full gradient, bottom row noise units.",
        "",
        image_links(copy_figures(manifest, "distance_heatmaps"), "heat map"),
        "",
        "Seed spread: each seed's phase-mean noise units per batch, their mean and +-1 sd across seeds.",
        "",
        image_links(copy_figures(manifest, "seed_spread"), "seed spread"),
        "",
        "## Distance by rank, against the null band",
        "",
        "Each metric's per-batch phase-mean distance against batch rank. The band is the 2.5-97.5 percentile range of "
        "the random ordering's per-batch phase means (its mean: the line); in noise units the same-parameter null "
        "has mean 0 and sd 1 per epoch by construction.",
        "",
        image_links(copy_figures(manifest, "distance_by_rank"), "distance by rank"),
        "",
        "## The paper's claims, across seeds",
        "",
        "Each row: one claim for one metric in one phase; a permutation test over batches (each batch's mean "
        "noise units over the phase's epochs and the seeds), Holm-adjusted over the table. **Supported** only when the "
        "pooled test passes and every seed's effect has the pooled sign; the class-balance columns repeat the test on "
        "distances residualised on each batch's class entropy (docs/analysis.md).",
        "",
        markdown(claims, {"claim": "claim", "ordering": "metric", "phase": "phase", "difference": "difference (z)",
                          "p_holm": "p (Holm)", "seed_differences": "difference per seed (z)",
                          "seeds_agreeing": "seeds agreeing", "pooled_verdict": "pooled verdict",
                          "verdict": "verdict", "adjusted_difference": "after class balance (z)",
                          "adjusted_p_holm": "p (Holm) after", "adjusted_verdict": "verdict after class balance"}),
        "",
        "## The class-balance confound",
        "",
        "Spearman correlation, per ordering and phase, of the batch's metric value and of its class entropy with its "
        "mean noise-unit distance, and the metric's partial correlation given class entropy (95 % bootstrap "
        "intervals over batches).",
        "",
        markdown(confound_table(confounds), {"ordering": "ordering", "phase": "phase", **CONFOUND_COLUMNS}),
        "",
        "Bold: the 95 % interval excludes 0. A metric correlation that disappears in the partial one is carried by "
        "the class mix.",
        "",
        "## Best and worst batches",
        "",
        "The best and the worst batch of every ordering and phase by mean noise units (all "
        f"{int(best_worst['rank'].max())} per side: table `best_worst_batches`), and their images.",
        "",
        markdown(best_worst[best_worst["rank"] == 1], {"ordering": "ordering", "phase": "phase", "kind": "kind",
                                                       "rank": "rank", "batch": "batch",
                              "noise_z_mean": "mean z", "distance_mean": "mean distance", "metric_mean": "metric mean",
                              "class_entropy": "class entropy"}),
        "",
        image_links(copy_figures(manifest, "batch_images"), "batch images"),
        "",
    ]
    kept = ""
    if PAGE.exists() and BEGIN in (text := PAGE.read_text()):
        kept = text[text.index(BEGIN): text.index(END) + len(END)]
    out += ["## The answer at this geometry", "",
            kept or f"{BEGIN}\n(to be written from the tables above)\n{END}", ""]
    PAGE.write_text("\n".join(out))
    print(f"wrote {PAGE} and {sum(1 for _ in FIGURES.rglob('*.png'))} figures under {FIGURES}")


if __name__ == "__main__":
    main()
