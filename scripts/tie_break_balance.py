"""Class balance of the edges ordering's batches: ties broken by image_id (before) vs by a seeded random key.

Run: .venv/bin/python scripts/tie_break_balance.py   (the embedded sample; figures quoted in docs/data_flow.md)
"""

import numpy as np

from best_minibatch.batches.batching import class_entropy, sort_into_batches, tied_images
from best_minibatch.data.cifar import read_image_dataset
from best_minibatch.metrics.scoring import score_images

dataset = read_image_dataset("data/01_raw/cifar10-sample.zip")
index = dataset.index
train = index[index["split"] == "train"].sort_values("row")
scores, _ = score_images("edges", dataset.images["train"].numpy(), train["image_id"].to_numpy(), {})
order = np.lexsort([scores["image_id"].to_numpy(), scores["score"].to_numpy()])[:5000]  # the old tie-break
labels = train.set_index("image_id").loc[scores["image_id"].to_numpy()[order], "label"].to_numpy().reshape(-1, 100)
print(f"tied images: {tied_images(scores, ('score',))}, distinct values: {scores['score'].nunique()}")
print(f"image_id tie-break: {class_entropy(np.stack([np.bincount(r, minlength=10) for r in labels])).mean():.4f}")
entropies = [sort_into_batches(scores, index, "edges", 100, tie_seed=s)[1]["class_entropy"].mean() for s in range(20)]
print(f"random tie-break, 20 seeds: {np.mean(entropies):.4f} +- {np.std(entropies, ddof=1):.4f} (sd)")
