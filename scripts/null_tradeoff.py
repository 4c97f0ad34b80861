"""Cost and precision of the same-parameter null against R (gradient_training.null_batches), on the base setup.

Trains the `random` ordering of the embedded sample (50 batches of 100, the base recipe's small CNN,
one CPU thread) for 3 epochs at lr 0.1 with R = 0, 5, 10, 20 null batches per epoch, and prints per R:
the wall seconds of a probed epoch (median of epochs 2-3, test evaluation included), the cost
relative to R = 0, and the precision of the null: the standard error of an epoch's null mean,
sd / sqrt(R), in units of the null's spread sd (a batch's noise_z is uncertain by that much from
the null alone; over a phase of E epochs, by that over sqrt(E)), with the null's measured mean and
sd at epoch 3.

Run: .venv/bin/python scripts/null_tradeoff.py   (figures quoted in docs/gradient_training.md)
"""

import statistics

import numpy as np
import torch
import yaml

from best_minibatch.data.cifar import read_image_dataset
from best_minibatch.gradient_training import GradientProbeRun, TrainingConfig, TrainingData

dataset = read_image_dataset("data/01_raw/cifar10-sample.zip")
train = dataset.index[dataset.index["split"] == "train"].sort_values("row")
order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
data = TrainingData(dataset.images["train"], torch.tensor(train["label"].to_numpy()),
                    order[:5000].view(50, 100))
shared = yaml.safe_load(open("conf/base/parameters.yml"))["training"]
recipe = {**shared, "phases": [{"epochs": 3, "lr": 0.1}], "device": "cpu", "progress_bar": False}


rows = []
for r in (0, 5, 10, 20):
    config = TrainingConfig.from_params({"checkpoint_dir": None, "keep_gradients": "none", "null_batches": r},
                                        recipe)
    probe_run = GradientProbeRun(config, data, config.recipe.model_factory(), "random")
    probe_run.run()
    history = probe_run.results.history
    rows.append((r, statistics.median(history["seconds"].iloc[1:]), probe_run.results.null_distances))
base = rows[0][1]
spread = rows[-1][2]
last = spread[spread["epoch"] == 3]["distance"]
print(f"null distances at epoch 3 (R=20): mean {last.mean():.4f}, sd {last.std():.4f}")
for r, seconds, _ in rows:
    precision = f"{1 / np.sqrt(r):.3f}" if r else "-"
    print(f"R={r:2d}: probed epoch {seconds:.3f} s wall (x{seconds / base:.3f} of R=0); "
          f"standard error of the null mean = {precision} null sd")
