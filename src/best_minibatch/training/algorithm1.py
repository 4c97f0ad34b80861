"""The paper's Algorithm 1: every mini-batch's gradient at the epoch-start parameters.

Knows nothing of Kedro. The shared loop (``loop.train_epochs``) is lines 3 and
6-11, the ordinary training of ``net_normal``; :class:`GradientProbe` is
``net_compare``, the rest, called by the loop as its hook::

     3: for e = 1 -> Epochs do                                   loop.train_epochs
     5:   net_compare.θ = net_normal.θ                           GradientProbe.start_epoch
     6:   for k, (inputs, targets) in (X, Y) do                  loop.train_epochs
  8-11:     outputs, loss, backward, update of net_normal         loop.train_epochs
 13-16:     ∇_k = gradient of net_compare at θ_e, same inputs    GradientProbe.after_step
    17:     cache ∇_k                                            GradientProbe.after_step (EpochGradients)
    19:   ∇_e = (1/K) Σ_k ∇_k                                    GradientProbe.end_epoch
    21:   D_e,k = ||∇_k − ∇_e||                                  GradientProbe.end_epoch

``net_compare`` is a separate module (its own parameters and BatchNorm buffers)
that takes ``net_normal``'s full state at line 5 and then only runs forward and
backward passes in training mode, never an update, so each ``∇_k`` is the
gradient at the epoch-start parameters. The ``batch_selection`` oracle probes its
candidates through the same class (``start_epoch``, ``gradient`` per candidate,
``end_epoch``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from best_minibatch.training.loop import EpochHook
from best_minibatch.training.probing import GRADIENT_MEASURES, EpochGradients, FlatGradient, measures_against
from best_minibatch.training.recipe import EpochPlan

#: ``(num_batches) -> EpochGradients``: where an epoch's gradients wait for the full gradient.
BufferFactory = Callable[[int], EpochGradients]


class GradientProbe(EpochHook):
    """``net_compare``: the gradient of each mini-batch at the epoch-start parameters, and the distances."""

    def __init__(self, net_normal: nn.Module, num_batches: Callable[[EpochPlan], int] | int,
                 buffer: BufferFactory, autocast: Callable[[], Any],
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy) -> None:
        self.net_compare = detached_copy(net_normal)
        self.flat = FlatGradient(self.net_compare)  # .grad of every parameter views one flat vector
        self.num_batches, self.buffer_factory, self.autocast = num_batches, buffer, autocast
        self.criterion = criterion
        self.buffer: EpochGradients | None = None

    def start_epoch(self, plan: EpochPlan, model: nn.Module) -> None:
        self.begin(model, self.num_batches(plan) if callable(self.num_batches) else self.num_batches)

    def begin(self, net_normal: nn.Module, num_batches: int) -> None:
        """Line 5: net_compare takes net_normal's full state (parameters and BatchNorm buffers)."""
        self.net_compare.load_state_dict(net_normal.state_dict())  # copies in place: the .grad views stay
        self.net_compare.train()
        self.flat.check_attached()
        self.close()
        self.buffer = self.buffer_factory(num_batches)  # where the ∇_k wait for ∇_e (line 17)

    def after_step(self, plan: EpochPlan | None, k: int, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.gradient(inputs, targets)

    def gradient(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Lines 13-17: forward and backward of net_compare on the same inputs, no update; cache ∇_k.

        Returns the flat gradient vector (a view that the next call overwrites).
        """
        self.flat.zero()
        with self.autocast():
            loss = self.criterion(self.net_compare(inputs), targets)
        loss.backward()
        self.buffer.append(self.flat.vector)
        return self.flat.vector

    def null_measures(self, batches) -> dict[str, Any]:
        """The same-parameter null: extra batches' gradients at the same θ_e, each measured against ∇_e at once.

        Random batches go through the same net_compare (still at the epoch-start
        parameters) after the epoch's K batches, so ∇_e is known; they never enter it,
        and no gradient is kept beyond its own measurement.
        """
        full = self.buffer.full_gradient()
        rows = []
        for inputs, targets in batches:
            self.flat.zero()
            with self.autocast():
                loss = self.criterion(self.net_compare(inputs), targets)
            loss.backward()
            rows.append(measures_against([self.flat.vector], full))
        return {c: np.concatenate([r[c] for r in rows]) if rows else np.zeros(0) for c in GRADIENT_MEASURES}

    def end_epoch(self, plan: EpochPlan | None = None) -> None:
        """Lines 19-21 run in :meth:`measures` (callers read them once the epoch is done)."""

    def measures(self) -> dict[str, Any]:
        """∇_e, the mean of the cached ∇_k, and each D_e,k = ||∇_k − ∇_e|| (exact, float64); frees the cache."""
        try:
            return self.buffer.measures()
        finally:
            self.close()

    def close(self) -> None:
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None


def detached_copy(model: nn.Module) -> nn.Module:
    """A separate module with its own parameters and buffers (never shares storage with ``model``)."""
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.grad = None
    return clone
