"""Write docs/results/full_cifar10_batch_order.md: the full environment in the fixed order against a shuffled order.

The paper trains the sorted batches in the same order every epoch, so a batch's rank in a
metric is also its place in the epoch. The control: the same batches, the same seeds and
settings, trained in a fresh order each epoch (`gradient_training.batch_order: shuffled`).
This page puts the two completed runs side by side, read from their outputs through their
run manifests (data/runs/): the within-epoch correlations of distance with rank and with the
place in the previous epoch (`position_effects`), and the paper's claims with their verdicts
in both orders. The section between the `conclusion` markers is written by hand and kept.

Run the shuffled order first (it reuses the fixed run's ingested, scored and sorted data):

    kedro run --env full --pipelines gradient_training,distance_analysis,visualize \\
        --params gradient_training.batch_order=shuffled
    .venv/bin/python scripts/batch_order_page.py [--fixed-run ID] [--shuffled-run ID]
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_results_page import (  # noqa: E402
    BEGIN,
    END,
    PROJECT_ROOT,
    completed_full_run,
    dataset_file,
    markdown,
    table,
)

from best_minibatch.analysis.statistics import position_effects  # noqa: E402
from best_minibatch.services.run_manifest import Manifest  # noqa: E402

PAGE = PROJECT_ROOT / "docs" / "results" / "full_cifar10_batch_order.md"
#: The orderings of the two runs this page compares (before the class-stratified orderings existed).
ORDERINGS = ("intensity", "color", "edges", "perceptual", "random")


def effects(manifest: Manifest) -> pd.DataFrame:
    """The run's ``position_effects``, or computed from its noise units when the run predates that table."""
    if "position_effects" in manifest.datasets and dataset_file(manifest, "position_effects").exists():
        return table(manifest, "position_effects")
    return position_effects(table(manifest, "distance_noise_units"))


def correlation(frame: pd.DataFrame, name: str) -> list[str]:
    return ["" if pd.isna(m) else f"{m:+.2f} ± {se:.2f} ({n}/{u} < 0)" for m, se, n, u in
            zip(frame[f"{name}_spearman"], frame[f"{name}_se"], frame[f"{name}_negative"], frame["n_units"])]


def side_by_side_effects(fixed: pd.DataFrame, shuffled: pd.DataFrame) -> pd.DataFrame:
    keys = ["ordering", "phase"]
    left = fixed.assign(fixed_rank=correlation(fixed, "rank"))[keys + ["fixed_rank"]]
    right = shuffled.assign(shuffled_rank=correlation(shuffled, "rank"),
                            shuffled_place=correlation(shuffled, "previous_position"),
                            shuffled_partial=correlation(shuffled, "rank_given_position"))
    return left.merge(right[keys + ["shuffled_rank", "shuffled_place", "shuffled_partial", "n_units"]], on=keys)


def side_by_side_claims(fixed: pd.DataFrame, shuffled: pd.DataFrame) -> pd.DataFrame:
    keys = ["claim_id", "claim", "ordering", "phase"]
    columns = ["difference", "seeds_agreeing", "verdict", "adjusted_difference", "adjusted_verdict"]
    merged = fixed[keys + columns].merge(shuffled[keys + columns], on=keys, suffixes=("_fixed", "_shuffled"))
    merged["changed"] = [("verdict" if a != b else "") + (" after balance" if c != d else "") for a, b, c, d in
                         zip(merged["verdict_fixed"], merged["verdict_shuffled"], merged["adjusted_verdict_fixed"],
                             merged["adjusted_verdict_shuffled"])]
    return merged


def hours(manifest: Manifest) -> float:
    return (datetime.fromisoformat(manifest.finished) - datetime.fromisoformat(manifest.started)).total_seconds() / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed-run", help="run id of the fixed-order run (default: the newest completed one)")
    parser.add_argument("--shuffled-run", help="run id of the shuffled-order run (default: the newest completed one)")
    args = parser.parse_args()
    os.chdir(PROJECT_ROOT)
    fixed = completed_full_run(args.fixed_run, "fixed")
    shuffled = completed_full_run(args.shuffled_run, "shuffled")
    seeds = shuffled.parameters["gradient_training"]["seeds"]
    training = pd.concat([table(shuffled, f"{o}.training_history") for o in ORDERINGS])
    fixed_effects, shuffled_effects = effects(fixed), effects(shuffled)
    claims = side_by_side_claims(table(fixed, "claim_verdicts"), table(shuffled, "claim_verdicts"))
    random_rows = side_by_side_effects(fixed_effects, shuffled_effects)

    out = [
        "# Fixed against shuffled batch order (all of CIFAR-10, the `full` environment)",
        "",
        f"Fixed order: run `{fixed.run_id}` ({fixed.command}), the run of "
        "[full_cifar10_fixed_order.md](full_cifar10_fixed_order.md). "
        f"Shuffled order: run `{shuffled.run_id}` ({shuffled.command}), {hours(shuffled):.2f} h, "
        f"{training['seconds'].sum() / 3600:.2f} h of training ({training['seconds'].mean():.1f} s per probed epoch). "
        "Same data, batches, model, phases, seeds "
        f"{seeds} and null batches; only the order of the batches within each epoch differs. This page is written by "
        "`.venv/bin/python scripts/batch_order_page.py` from the two runs' outputs; the last section is written by "
        "hand.",
        "",
        "## Rank or place in the epoch?",
        "",
        "Every batch of epoch e is probed at the parameters that epoch e-1's steps made. Per ordering and phase: the "
        "within-epoch Spearman correlation of a batch's distance with its rank in the sorted metric (batch number), "
        "and, in the shuffled run, with its place in the previous epoch (step; larger = trained more recently) and "
        "the rank's partial correlation given that place; mean ± standard error over seed-epochs (epochs after the "
        "first), with how many were negative. In the fixed order rank and place are the same number "
        "(`distance_analysis.position_effects`, docs/analysis.md).",
        "",
        markdown(random_rows, {"ordering": "ordering", "phase": "phase",
                               "fixed_rank": "fixed: rho(rank) = rho(place)", "shuffled_rank": "shuffled: rho(rank)",
                               "shuffled_place": "shuffled: rho(place in previous epoch)",
                               "shuffled_partial": "shuffled: rho(rank | place)", "n_units": "seed-epochs"}),
        "",
        "## The paper's claims in both orders",
        "",
        "Verdicts as on the main page (permutation test over batches on noise units, Holm over the table, supported "
        "only when every seed agrees in sign), and after class balance (distances residualised on class entropy).",
        "",
        markdown(claims, {"claim": "claim", "ordering": "metric", "phase": "phase",
                          "difference_fixed": "fixed: difference (z)", "verdict_fixed": "fixed: verdict",
                          "adjusted_verdict_fixed": "fixed: after class balance",
                          "difference_shuffled": "shuffled: difference (z)",
                          "seeds_agreeing_shuffled": "shuffled: seeds agreeing",
                          "verdict_shuffled": "shuffled: verdict",
                          "adjusted_difference_shuffled": "shuffled: after balance (z)",
                          "adjusted_verdict_shuffled": "shuffled: after class balance", "changed": "changed"}),
        "",
        f"{int((claims['changed'] != '').sum())} of {len(claims)} rows change verdict in at least one column.",
        "",
    ]
    kept = ""
    if PAGE.exists() and BEGIN in (text := PAGE.read_text()):
        kept = text[text.index(BEGIN): text.index(END) + len(END)]
    out += ["## What the control says", "", kept or f"{BEGIN}\n(to be written from the tables above)\n{END}", ""]
    PAGE.write_text("\n".join(out))
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
