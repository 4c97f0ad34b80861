"""Gradient probing: a mini-batch's gradient at fixed parameters, and its distance to the full gradient.

Knows nothing of Kedro. The training loop (``training.py``) and the batch
selection oracle (``selection.py``) both probe through these functions.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batch_gradient(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn = nn.functional.cross_entropy,
) -> torch.Tensor:
    """The flattened gradient of the mean loss over one batch at the model's current parameters.

    The model is run in whatever mode it is in (the paper's ``net_compare`` is in
    training mode, so BatchNorm uses batch statistics and updates its running
    buffers: probe a copy, never the model being trained). Nothing is updated.
    Returns a 1-D tensor in the parameters' dtype, on their device, in
    ``model.parameters()`` order; parameters without a gradient contribute zeros.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(inputs), targets)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def distance_measures(gradients: torch.Tensor | np.ndarray) -> dict[str, np.ndarray | float]:
    """Exact distances of each row of a ``K x P`` gradient matrix to the rows' mean.

    The mean of the K mini-batch gradients is the full-batch gradient (equation 3
    of the paper; every batch has the same size). Computed in float64. Returns
    ``distance`` (``||g_k - g_full||``), ``cosine_similarity``,
    ``relative_distance`` (``distance / ||g_full||``), ``grad_norm`` (``||g_k||``),
    each of length K, and the scalar ``full_grad_norm``.
    """
    g = torch.as_tensor(gradients).to(torch.float64)
    full = g.mean(dim=0)
    full_norm = torch.linalg.vector_norm(full)
    norms = torch.linalg.vector_norm(g, dim=1)
    distance = torch.linalg.vector_norm(g - full, dim=1)
    cosine = (g @ full) / (norms * full_norm)
    return {
        "distance": distance.numpy(),
        "cosine_similarity": cosine.numpy(),
        "relative_distance": (distance / full_norm).numpy(),
        "grad_norm": norms.numpy(),
        "full_grad_norm": float(full_norm),
    }
