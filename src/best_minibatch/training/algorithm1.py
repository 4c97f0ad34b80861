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
    19:   ∇_e = (1/K) Σ_k ∇_k                                    GradientProbe.measures
    21:   D_e,k = ||∇_k − ∇_e||                                  GradientProbe.measures

Lines 19-21 run when the caller reads the epoch's measures (:meth:`GradientProbe.measures`,
after the same-parameter null if any), not in ``end_epoch``, which does nothing.

``net_compare`` is a separate module (its own parameters and BatchNorm buffers)
that takes ``net_normal``'s full state at line 5 and then only runs forward and
backward passes in training mode, never an update, so each ``∇_k`` is the
gradient at the epoch-start parameters. The ``batch_selection`` oracle probes its
candidates through the same class (``start_epoch``, ``gradient`` per candidate,
``measures``).

``chunk`` (``training.probe_chunk``) switches lines 13-17 to the batched probe
(``batched_probe.BatchedGradients``): since net_compare stays at θ_e for the whole
epoch, ``after_step`` only queues the step's inputs and targets, and every ``chunk``
steps (and at the epoch's last step) computes the queued batches' gradients in one
vmapped call, appending them to the same :class:`EpochGradients` in step order.
``measures`` and ``null_measures`` compute whatever is still queued first. BatchNorm
runs on each batch's own statistics as in the sequential probe, but net_compare's
running statistics are not updated (nothing reads them). The sequential probe
(``chunk`` 0, the default) is the reference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from best_minibatch.training.batched_probe import BatchedGradients
from best_minibatch.training.loop import EpochHook
from best_minibatch.training.probing import GRADIENT_MEASURES, EpochGradients, FlatGradient, measures_against
from best_minibatch.training.recipe import PROBE_CHUNK_AUTO, EpochPlan

#: ``(num_batches) -> EpochGradients``: where an epoch's gradients wait for the full gradient.
BufferFactory = Callable[[int], EpochGradients]


class GradientProbe(EpochHook):
    """``net_compare``: the gradient of each mini-batch at the epoch-start parameters, and the distances.

    ``chunk``: 0 (default) computes each ∇_k at its step (the reference); ``"auto"``
    or a positive integer computes them batched (see the module docstring).
    """

    def __init__(self, net_normal: nn.Module, num_batches: Callable[[EpochPlan], int] | int,
                 buffer: BufferFactory, autocast: Callable[[], Any],
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
                 chunk: int | str = 0) -> None:
        self.net_compare = detached_copy(net_normal)
        self.flat = FlatGradient(self.net_compare)  # .grad of every parameter views one flat vector
        self.num_batches, self.buffer_factory, self.autocast = num_batches, buffer, autocast
        self.criterion = criterion
        self.buffer: EpochGradients | None = None
        if chunk != PROBE_CHUNK_AUTO and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0):
            raise ValueError(f"chunk must be 0 (sequential), {PROBE_CHUNK_AUTO!r} or a positive integer, got {chunk!r}.")
        self.batched = (BatchedGradients(self.net_compare, criterion, autocast,
                                         None if chunk == PROBE_CHUNK_AUTO else chunk) if chunk else None)
        self.queue: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, inputs, targets) not yet probed

    def start_epoch(self, plan: EpochPlan, model: nn.Module) -> None:
        self.begin(model, self.num_batches(plan) if callable(self.num_batches) else self.num_batches)

    def begin(self, net_normal: nn.Module, num_batches: int) -> None:
        """Line 5: net_compare takes net_normal's full state (parameters and BatchNorm buffers)."""
        self.net_compare.load_state_dict(net_normal.state_dict())  # copies in place: the .grad views stay
        self.net_compare.train()
        self.flat.check_attached()
        self.close()
        self.buffer = self.buffer_factory(num_batches)  # where the ∇_k wait for ∇_e (line 17)

    def after_step(self, plan: EpochPlan | None, k: int, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
        """Lines 13-17 for step ``k``: the flat gradient (sequential), or the rows computed now (batched)."""
        if self.batched is None:
            return self.gradient(inputs, targets)
        return self.step_gradients(k, inputs, targets) or None

    def step_gradients(self, k: int, inputs: torch.Tensor, targets: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Lines 13-17 for step ``k``; returns ``(step, ∇_step)`` of every gradient computed by this call, in order.

        Sequential: step ``k``'s own (a view the next call overwrites). Batched: the
        step is queued; when the queue holds a chunk, or the epoch's last step, the
        queued steps' gradients (fresh tensors).
        """
        if self.batched is None:
            return [(k, self.gradient(inputs, targets))]
        if self.batched.chunk is None:
            self.batched.choose_chunk(inputs, targets)  # probe_chunk: auto, from free memory
        self.queue.append((k, inputs, targets))
        full = len(self.buffer) + len(self.queue) == self.buffer.num_batches
        if full or (self.batched.chunk is not None and len(self.queue) >= self.batched.chunk):
            return self.flush()
        return []

    def flush(self) -> list[tuple[int, torch.Tensor]]:
        """Compute and cache (line 17) the queued steps' gradients; returns them with their steps."""
        if not self.queue:
            return []
        steps = [k for k, _, _ in self.queue]
        rows = list(self.batched.gradients([(x, y) for _, x, y in self.queue]))
        self.queue = []
        for row in rows:
            self.buffer.append(row)
        return list(zip(steps, rows, strict=True))

    def gradient(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Lines 13-17, one batch at a time: forward and backward of net_compare, no update; cache ∇_k.

        Returns the flat gradient vector (a view that the next call overwrites).
        """
        self.flush()  # a batched probe's queued steps come first
        self.buffer.append(self._compare_gradient(inputs, targets))
        return self.flat.vector

    def _compare_gradient(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """net_compare's gradient on one batch at its current (epoch-start) parameters, in :attr:`flat`."""
        self.flat.zero()
        with self.autocast():
            loss = self.criterion(self.net_compare(inputs), targets)
        loss.backward()
        return self.flat.vector

    def null_measures(self, batches) -> dict[str, Any]:
        """The same-parameter null: extra batches' gradients at the same θ_e, each measured against ∇_e at once.

        Random batches go through the same net_compare (still at the epoch-start
        parameters) after the epoch's K batches, so ∇_e is known; they never enter it,
        and no gradient is kept beyond its own measurement. They are probed one at a
        time in both modes (the batched probe's queue is computed first).
        """
        self.flush()
        full = self.buffer.full_gradient()
        rows = [measures_against([self._compare_gradient(inputs, targets)], full) for inputs, targets in batches]
        return {c: np.concatenate([r[c] for r in rows]) if rows else np.zeros(0) for c in GRADIENT_MEASURES}

    def end_epoch(self, plan: EpochPlan | None = None) -> None:
        """Nothing: lines 19-21 run in :meth:`measures`, when the caller reads them."""

    def measures(self) -> dict[str, Any]:
        """Lines 19-21: ∇_e, the mean of the cached ∇_k, and each D_e,k = ||∇_k − ∇_e|| (exact, float64).

        Computes a batched probe's queued steps first; frees the cache.
        """
        try:
            self.flush()
            return self.buffer.measures()
        finally:
            self.close()

    def close(self) -> None:
        self.queue = []
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None


def detached_copy(model: nn.Module) -> nn.Module:
    """A separate module with its own parameters and buffers (never shares storage with ``model``)."""
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.grad = None
    return clone
