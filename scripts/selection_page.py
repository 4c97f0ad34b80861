"""Write docs/results/full_cifar10_selection.md from a completed `kedro run --env full --pipelines=batch_selection`.

Everything on the page is read from the run's own outputs, found through its run manifest
(data/runs/): the setup (from the run's parameters and validation split), the convergence
figure the run drew (validation accuracy against optimizer steps and against seconds with
the selection's cost, mean and 95% band per policy; copied next to the page), the table of
every policy at equal steps and at equal wall-clock with paired tests over seeds and Holm
over policies, the run's answer in one sentence and the class-balance answer, beside the
base sample's answer and the outside results the question is anchored to (issue 24). The
section between the `conclusion` markers is written by hand and kept as it is when the page
is regenerated; everything else is replaced.

Run the experiment first (docs/batch_selection.md, "Full geometry"), then:

    .venv/bin/python scripts/selection_page.py [--run-id ID] [--base-run ID]

`--env`, `--project-root` and `--page` point it at another environment, data folder or page
(the tests run it on a tiny base run's outputs).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))

from best_minibatch import selection  # noqa: E402
from best_minibatch.selection import statistics as T  # noqa: E402
from best_minibatch.services.run_manifest import Manifest, ManifestStore  # noqa: E402

PAGE = PROJECT_ROOT / "docs" / "results" / "full_cifar10_selection.md"
MANIFESTS = Path("data") / "runs" / "run_manifest.json"  # relative to the project root
BASE_DOC = PROJECT_ROOT / "docs" / "batch_selection.md"
BEGIN, END = "<!-- conclusion: written by hand, kept on regeneration -->", "<!-- end of conclusion -->"
SUMMARY = "batch_selection.summary"
COMMAND = "kedro run --env full --pipelines=batch_selection --runner=best_minibatch.kedro_glue.runner.DaskRunner"

#: The outside results issue 24 anchors the question to, with what each reports (in words, no figures).
ANCHORS = (
    ("No Train No Gain", "arXiv 2307.06440",
     "the gains of Selective Backprop and RHO-LOSS vanish when compared at a fixed compute budget"),
    ("Balles et al.", "arXiv 2312.05021",
     "loss-based and gradient-matching selection do not consistently beat random selection"),
    ("Zhao & Zhang", "arXiv 1405.3080",
     "stratified (class-balanced) sampling of mini-batches lowers the variance of the stochastic gradient"),
)


def selection_run(store: ManifestStore, run_id: str | None, env: str | None) -> Manifest:
    """The named run's manifest, or the last completed run of ``env`` that wrote batch_selection's summary."""
    if run_id is not None:
        manifest = store.read(run_id)
        if manifest is None:
            raise SystemExit(f"No run {run_id} under {store.root}.")
    else:
        manifest = store.last_completed({i: m for i, m in store.all().items()
                                         if (m.env or "base") == env and SUMMARY in m.outputs})
        if manifest is None:
            raise SystemExit(f"No completed run of --env {env} with batch_selection under {store.root}. Run "
                             f"`{COMMAND}` first.")
    if SUMMARY not in manifest.datasets:
        raise SystemExit(f"Run {manifest.run_id} has no {SUMMARY}: it did not run batch_selection.")
    return manifest


def dataset_file(root: Path, manifest: Manifest, name: str) -> Path:
    """The file of ``name``'s version in the run's state (a versioned dataset: <path>/<version>/<file name>)."""
    entry = manifest.datasets[name]
    path = root / entry.path
    return path / entry.version / path.name


def table(root: Path, manifest: Manifest, name: str) -> pd.DataFrame:
    return pd.read_parquet(dataset_file(root, manifest, f"batch_selection.{name}"))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def hours(manifest: Manifest) -> float:
    return (datetime.fromisoformat(manifest.finished) - datetime.fromisoformat(manifest.started)).total_seconds() / 3600


def _points(row: pd.Series, prefix: str) -> str:
    return (f"{100 * row[f'{prefix}_diff']:+.1f} points [{100 * row[f'{prefix}_diff_low']:+.1f}, "
            f"{100 * row[f'{prefix}_diff_high']:+.1f}], Holm p = {row[f'{prefix}_p_holm']:.2g}")


def class_balance_answer(summary: pd.DataFrame, baseline: str = selection.BASELINE) -> str:
    """Whether class balancing helps, in one sentence with its numbers (both comparisons, both balanced policies)."""
    rows = summary.set_index("policy")
    present = [p for p in selection.CLASS_BALANCED if p in rows.index]
    if not present:
        return "Class balancing was not among this run's policies."
    parts = []
    for policy in present:
        row = rows.loc[policy]
        steps = f"{row['verdict']} at equal steps (mean validation accuracy over training {_points(row, 'val_auc')})"
        if "wallclock_verdict" in rows.columns:
            steps += (f" and {row['wallclock_verdict']} at equal wall-clock (validation accuracy at {baseline}'s "
                      f"run time {_points(row, 'val_at_budget')})")
        parts.append(f"{policy}: {steps}")
    helps = any(rows.loc[p, "verdict"] == T.FASTER for p in present)
    lead = "Class balancing helped" if helps else "Class balancing did not detectably help"
    return f"{lead} against {baseline}: " + "; ".join(parts) + "."


def base_answer(store: ManifestStore, root: Path, base_run: str | None) -> tuple[str, str]:
    """The base sample's answer and where it comes from: a completed base run's summary, else the measured
    sentence quoted in docs/batch_selection.md."""
    manifest = None
    if base_run is not None:
        manifest = store.read(base_run)
    else:
        manifest = store.last_completed({i: m for i, m in store.all().items()
                                         if (m.env or "base") == "base" and SUMMARY in m.outputs})
    if manifest is not None and SUMMARY in manifest.datasets:
        summary = table(root, manifest, "summary")
        split = table(root, manifest, "validation_split")
        params = manifest.parameters
        batch = ((params.get("batch_selection") or {}).get("training") or {}).get("batch_size") or \
            (params.get("sort_batches") or {}).get("batch_size")
        where = (f"base run `{manifest.run_id}`: {int((split['subset'] == 'train').sum()):,} training images, "
                 f"batches of {batch}, policies {', '.join(summary['policy'])}")
        return T.answer_sentence(summary, selection.BASELINE), where
    text = BASE_DOC.read_text(encoding="utf-8")
    found = re.search(r"Answer \(the run's own sentence\):\s*\n\s*\n\*(.+?)\*\n", text, re.S)
    if not found:
        raise SystemExit(f"No base run under {store.root} and no measured answer in {BASE_DOC}; pass --base-run.")
    return " ".join(found.group(1).split()), ("the base run measured in docs/batch_selection.md, on the embedded "
                                               "sample, without the class-balanced policies")


def setup_lines(manifest: Manifest, split: pd.DataFrame, results: pd.DataFrame) -> dict[str, str]:
    params: dict[str, Any] = manifest.parameters
    config = selection.SelectionConfig.from_params(params["batch_selection"], params.get("training"),
                                                   (params.get("sort_batches") or {}).get("batch_size"))
    setup = selection.describe_setup(config, split, results)
    setup.pop("device", None)  # the machine that writes the page, not the run's
    upfront = results.groupby("policy")["upfront_seconds"].mean() if "upfront_seconds" in results else pd.Series()
    charged = {p: s for p, s in upfront.items() if s > 0}
    setup["selection cost"] = (
        "counted in every run's seconds: drawing the epoch's batches and the oracle's probes (in the loop's clock)"
        + "".join(f"; {p} is charged {s:,.0f} s up front (the measured seconds of the gradient_training run "
                  f"whose distances it uses)" for p, s in charged.items()))
    return setup


def write_page(manifest: Manifest, root: Path, page: Path, base: tuple[str, str]) -> str:
    results = table(root, manifest, "run_results")
    summary, curve_summary = table(root, manifest, "summary"), table(root, manifest, "curve_summary")
    split = table(root, manifest, "validation_split")
    notes_file = dataset_file(root, manifest, "batch_selection.notes")
    notes = json.loads(notes_file.read_text()) if notes_file.exists() else []
    sentence = T.answer_sentence(summary, selection.BASELINE)
    setup = setup_lines(manifest, split, results)
    content = T.report_content(summary, curve_summary, sentence, setup, notes, selection.BASELINE)

    figures = page.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    figure = figures / "convergence.png"
    shutil.copy2(dataset_file(root, manifest, "batch_selection.convergence_png"), figure)

    seeds = sorted(results["seed"].unique())
    per_policy = results.groupby("policy", sort=False)[["seconds", "total_seconds"]].mean()
    base_sentence, base_source = base
    out = [
        "# Do the best mini-batches, or class-balanced ones, train faster? (all of CIFAR-10, the `full` environment)",
        "",
        f"Run `{manifest.run_id}` ({manifest.command or COMMAND}), {hours(manifest):.2f} h end to end; "
        f"{len(results)} runs ({results['policy'].nunique()} policies x {len(seeds)} seeds), "
        f"{results['seconds'].sum() / 3600:.2f} h of training and probing summed over runs. This page is written by "
        "`.venv/bin/python scripts/selection_page.py` from the run's outputs (docs/batch_selection.md describes "
        "every policy and test); the last section is written by hand.",
        "",
        "## Setup",
        "",
        *[f"- **{key}**: {value}" for key, value in setup.items()],
        "",
        "Mean seconds per run (training, batches, probing; with the up-front selection cost): "
        + ", ".join(f"{p} {row['seconds']:.0f} / {row['total_seconds']:.0f} s" for p, row in per_policy.iterrows())
        + ".",
        "",
        "## Convergence",
        "",
        f"![validation accuracy against steps and seconds]({figure.relative_to(page.parent).as_posix()})",
        "",
        content.figure_caption,
        "",
        "## The table",
        "",
        content.method,
        "",
        markdown_table(content.summary_header, content.summary_rows),
        "",
    ]
    if content.control_rows:
        out += [content.control_caption, "", markdown_table(content.control_header, content.control_rows), ""]
    out += [content.epochs_caption, "", markdown_table(content.epochs_header, content.epochs_rows), ""]
    if notes:
        out += ["Notes:", "", *[f"- {note}" for note in notes], ""]
    out += [
        "## The answer",
        "",
        f"**This run:** {sentence}",
        "",
        f"**Class balancing:** {class_balance_answer(summary)}",
        "",
        f"**The base sample** ({base_source}): {base_sentence}",
        "",
        "**Outside results** the question is anchored to (issue 24):",
        "",
        *[f"- {name} ({where}): {claim}." for name, where, claim in ANCHORS],
        "",
    ]
    kept = ""
    if page.exists() and BEGIN in (text := page.read_text(encoding="utf-8")):
        kept = text[text.index(BEGIN): text.index(END) + len(END)]
    out += ["## What it means", "", kept or f"{BEGIN}\n(to be written from the tables above)\n{END}", ""]
    page.write_text("\n".join(out), encoding="utf-8")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", help="the batch_selection run (default: the newest completed one of --env)")
    parser.add_argument("--env", default="full", help="the run's environment (default: full; base: no --env)")
    parser.add_argument("--base-run", help="a base run with batch_selection, for the base sample's answer "
                                           "(default: the newest such run, else docs/batch_selection.md's)")
    parser.add_argument("--project-root", type=Path, default=PROJECT_ROOT, help="where data/ is")
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    root = args.project_root.resolve()
    store = ManifestStore(root / MANIFESTS)
    manifest = selection_run(store, args.run_id, args.env)
    write_page(manifest, root, args.page, base_answer(store, root, args.base_run))
    print(f"wrote {args.page}")


if __name__ == "__main__":
    main()
