"""Algorithm 1's probe, several mini-batches at a time: ``torch.func`` over a batch-of-batches axis.

Knows nothing of Kedro. Every ``∇_k`` of an epoch is taken at the same parameters
θ_e (``net_compare`` never updates), so the K gradients need not be computed one
batch after another: :class:`BatchedGradients` stacks B mini-batches into a
``B x N x ...`` tensor and computes their B gradients in one call of
``vmap(grad(loss))`` over that leading axis, the parameters shared
(``functional_call``).

BatchNorm: each mini-batch is normalised with its own batch statistics, as the
sequential probe's training-mode forward does (vmap's batch-norm rule keeps the
statistics per vmapped batch). The running statistics are neither used nor
updated: while the call runs, every BatchNorm module of the model has
``track_running_stats`` off, which in training mode makes it pass no running
buffers to ``F.batch_norm`` (the gradient does not depend on them in training
mode), and the flag is restored afterwards.

The sequential probe (``algorithm1.GradientProbe`` without ``chunk``) stays the
reference. The two agree to rounding: vmap runs other kernels (a batched
convolution is one grouped convolution; BatchNorm's affine part is applied after
the normalisation rather than fused with it), so the sums are taken in another
order and the results are not bit-identical (tests/test_batched_probe.py states the
tolerances measured in float64 and float32).

How many batches go into one call (the chunk) is chosen from free memory
(:func:`chunk_for_memory`): the bytes autograd saves for one batch's backward,
measured by one forward pass, against free GPU memory or the RAM the kernel calls
available.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from best_minibatch.training.runtime import available_memory

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Share of free memory one chunk may use (the rest: the model, the gradient buffer, fragmentation).
MEMORY_FRACTION = 0.5
#: No more batches than this in one call (beyond it a GPU is already saturated).
MAX_CHUNK = 64


@contextlib.contextmanager
def batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics and leave their running buffers alone.

    For a model in training mode; restores every layer's ``track_running_stats``.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    previous = [m.track_running_stats for m in layers]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in zip(layers, previous, strict=True):
            m.track_running_stats = flag


def saved_bytes_per_batch(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                          criterion: LossFn = nn.functional.cross_entropy,
                          autocast: Callable[[], Any] = contextlib.nullcontext) -> int:
    """Bytes autograd keeps for the backward pass of one batch (each storage counted once).

    One forward pass with batch statistics only (no running buffer changes); nothing is
    kept afterwards.
    """
    seen: dict[tuple[int, torch.device], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[(storage.data_ptr(), tensor.device)] = storage.nbytes()
        return tensor

    with torch.enable_grad(), batch_statistics_only(model), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast():
        loss = criterion(model(inputs), targets)
    del loss
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for (ptr, _), n in seen.items() if ptr not in parameters)


def chunk_for_memory(per_batch_bytes: float, num_params: int, itemsize: int, free_bytes: float,
                     fraction: float = MEMORY_FRACTION, maximum: int = MAX_CHUNK) -> int:
    """Batches per call that fit ``fraction`` of ``free_bytes``: at least 1, at most ``maximum``.

    One batch costs its saved activations about twice over (vmap's batched kernels keep
    an input-sized and an output-sized copy of some of them) plus three gradient-sized
    vectors (vmap's per-parameter result, the flattened row, the buffer's float64 sum
    arithmetic).
    """
    cost = 2 * per_batch_bytes + 3 * num_params * itemsize
    return int(max(1, min(maximum, (fraction * free_bytes) // max(cost, 1))))


class BatchedGradients:
    """The flattened gradients of several mini-batches at a model's current parameters, in one call.

    ``model`` is probed in place (``net_compare``): its parameters are read where they
    are, so loading a new state into the model (``load_state_dict`` copies in place)
    is seen by the next call; nothing of the model is changed. Rows come in
    ``model.parameters()`` order (the order of ``probing.FlatGradient``), in the
    parameters' dtype. ``chunk``: batches per call; ``None`` chooses it from free
    memory at the first call (:attr:`chunk` then holds it).
    """

    def __init__(self, model: nn.Module, criterion: LossFn = nn.functional.cross_entropy,
                 autocast: Callable[[], Any] = contextlib.nullcontext, chunk: int | None = None) -> None:
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ValueError(f"chunk must be a positive integer or None (from free memory), got {chunk!r}.")
        self.model, self.criterion, self.autocast = model, criterion, autocast
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("The model has no trainable parameters.")
        self.num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.chunk = chunk

        def batch_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.criterion(torch.func.functional_call(self.model, params, (x,)), y)

        self._per_batch = torch.func.vmap(torch.func.grad(batch_loss), in_dims=(None, 0, 0))

    def _params(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {name: named[name].detach() for name in self.names}

    def choose_chunk(self, inputs: torch.Tensor, targets: torch.Tensor, free_bytes: float | None = None) -> int:
        """Set :attr:`chunk` from one batch (``inputs``: ``N x ...``) and free memory on its device."""
        first = next(self.model.parameters())
        per_batch = saved_bytes_per_batch(self.model, inputs, targets, self.criterion, self.autocast)
        free = available_memory(inputs.device) if free_bytes is None else free_bytes
        self.chunk = chunk_for_memory(per_batch, self.num_params, first.element_size(), free)
        return self.chunk

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``B x P`` gradients of the B batches ``inputs[b]`` (``B x N x ...``), ``targets[b]`` (``B x N``).

        Computed in one vmapped call regardless of :attr:`chunk` (the caller cuts chunks).
        """
        if inputs.shape[:2] != targets.shape[:2]:
            raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ in their "
                             "first two (batch-of-batches, batch) dimensions.")
        if not self.model.training:
            raise RuntimeError("The probed model must be in training mode (batch statistics), as net_compare is.")
        count = inputs.shape[0]
        with batch_statistics_only(self.model), self.autocast():
            grads = self._per_batch(self._params(), inputs, targets)
        return torch.cat([grads[name].reshape(count, -1) for name in self.names], dim=1)

    def gradients(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[torch.Tensor]:
        """Each batch's gradient row, in order, computed :attr:`chunk` batches at a time (stacked here)."""
        if not batches:
            return
        if self.chunk is None:
            self.choose_chunk(*batches[0])
        for start in range(0, len(batches), self.chunk):
            part = batches[start:start + self.chunk]
            rows = self(torch.stack([x for x, _ in part]), torch.stack([y for _, y in part]))
            yield from rows
