"""False-verdict rate under the null and power at planted shifts, for the project's claim family.

Simulated worlds (best_minibatch.analysis.calibration): every "metric" scores images at
random, the batches are cut by the project's sort_batches (plain and stratified, the control
with one batching per seed) from real CIFAR-10 labels, and distances carry a class-composition
term, a persistent batch term, a place-in-the-epoch (recency) term and epoch noise. The
project's own analysis then gives verdicts. Per geometry and batch order it prints:

* null: the per-test rate of raw p < alpha (the primary rank test), and the share of rows and
  of worlds (the 24-row claim family) with a decided final verdict;
* power: the share of worlds in which a planted shift of 0.5 and 1.0 between-batch standard
  deviations (intensity's upper quartile closer in phase 1) is called `supported`, in the
  stratified ordering and the plain one (primary and adjusted verdicts).

Run: .venv/bin/python scripts/calibration.py --json docs/results/calibration.json
     (figures quoted in docs/analysis.md, "Calibration and power")
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from best_minibatch.analysis import calibration as cal
from best_minibatch.data.cifar import read_image_dataset

ROOT = Path(__file__).resolve().parents[1]
GEOMETRIES = {
    # the base run: the embedded sample, 50 batches of 100, 2 seeds, 3 x 2 epochs, R = 10
    "base": (ROOT / "data/01_raw/cifar10-sample.zip", 100, cal.SimulatedWorld(n_seeds=2, phase_epochs=(2, 2, 2))),
    # the full environment: all of CIFAR-10, 195 batches of 256, 3 seeds, 3 x 4 epochs, R = 10
    "full": (ROOT.parent / "shared/data/cifar10-jpeg.zip", 256,
             cal.SimulatedWorld(n_seeds=3, phase_epochs=(4, 4, 4))),
}


def markdown_tables(results: list[dict]) -> str:
    """The two tables docs/analysis.md quotes: the null rates and the power."""
    lines = ["| geometry | order | worlds | rows with raw p < 0.05 | families with a test verdict (before the gate "
             "and the fixed-order label) | rows with a final verdict | families with any final verdict | families "
             "with any adjusted verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["kind"] == "null":
            lines.append(f"| {r['geometry']} | {r['batch_order']} | {r['worlds']} | {r['raw_rows']:.3f} | "
                         f"{r['test_worlds']:.3f} | {r['final_rows']:.3f} | {r['final_worlds']:.3f} | "
                         f"{r['adjusted_final_worlds']:.3f} |")
    lines += ["", "| geometry | planted shift | worlds | stratified: supported | plain: supported | "
              "plain, composition fixed: supported |", "|---|---|---|---|---|---|"]
    for r in results:
        if r["kind"].startswith("power"):
            lines.append(f"| {r['geometry']} | {r['kind'].removeprefix('power at ')} | {r['worlds']} | "
                         f"{r['stratified']:.2f} | {r['plain']:.2f} | {r['plain_adjusted']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=[*GEOMETRIES, "all"], default="all")
    parser.add_argument("--worlds", type=int, default=40, help="simulated worlds per cell")
    parser.add_argument("--full-worlds", type=int, help="worlds per cell at the full geometry (default: --worlds)")
    parser.add_argument("--permutations", type=int, default=2000)
    parser.add_argument("--recency", type=float, default=2.0,
                        help="noise units by which the last-trained batch of an epoch is closer than the first")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--tables-from", type=Path, help="only print the Markdown tables of a JSON written before")
    args = parser.parse_args()
    if args.tables_from:
        print(markdown_tables(json.loads(args.tables_from.read_text())["results"]))
        return
    results = []
    for name in GEOMETRIES if args.geometry == "all" else [args.geometry]:
        path, batch_size, world = GEOMETRIES[name]
        worlds = args.full_worlds if name == "full" and args.full_worlds else args.worlds
        world = cal.SimulatedWorld(**{**world.__dict__, "recency": args.recency})
        index = read_image_dataset(path).index
        train = index[index["split"] == "train"]
        labels = np.zeros(int(train["image_id"].max()) + 1, dtype=np.int64)
        labels[train["image_id"].to_numpy()] = train["label"].to_numpy()

        def score(metric: str, draw: int, train=train) -> pd.DataFrame:
            rng = cal.world_seed("scores", draw, metric)
            return pd.DataFrame({"image_id": train["image_id"].to_numpy(), "score": rng.random(len(train))})

        for order in ("shuffled", "fixed"):
            started = time.perf_counter()
            tables = []
            for draw in range(worlds):
                batchings = cal.null_batchings(index, "random", batch_size, draw, score, world.n_seeds)
                run = cal.simulate_run(batchings, labels, world, order, cal.world_seed("world", draw, order))
                tables.append(cal.analyse(run, args.permutations))
            rates = cal.verdict_rates(tables)
            results.append({"geometry": name, "batch_order": order, "kind": "null", **rates,
                            "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(results[-1]), flush=True)
        for shift in (0.5, 1.0):
            started = time.perf_counter()
            rows = []
            for draw in range(worlds):
                batchings = cal.null_batchings(index, "random", batch_size, draw, score, world.n_seeds)
                planted = cal.planted_shift(world, batchings, "intensity", shift)
                run = cal.simulate_run(batchings, labels, world, "shuffled",
                                       cal.world_seed("power", draw, shift), planted)
                claims = cal.analyse(run, args.permutations).set_index(["claim_id", "ordering", "phase"])
                rows.append({kind: claims.loc[("first_phase_upper_quartile_closest", ordering, 1), column]
                             for kind, ordering, column in (("stratified", "intensity_stratified", "verdict"),
                                                            ("plain", "intensity", "verdict"),
                                                            ("plain_adjusted", "intensity", "adjusted_verdict"))})
            power = {kind: float(np.mean([row[kind] == "supported" for row in rows])) for kind in rows[0]}
            results.append({"geometry": name, "batch_order": "shuffled", "kind": f"power at {shift} sd",
                            "worlds": worlds, **power, "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(results[-1]), flush=True)
    print(markdown_tables(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"worlds": args.worlds, "full_worlds": args.full_worlds or args.worlds,
                                         "permutations": args.permutations,
                                         "recency": args.recency, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
