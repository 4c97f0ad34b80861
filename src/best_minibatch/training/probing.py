"""Gradient probing: a mini-batch's gradient at fixed parameters, and its distance to the full gradient.

Knows nothing of Kedro. The training loop (``training.py``) and the batch
selection oracle (``selection.py``) both probe through these functions.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

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


def measures_against(rows: list[torch.Tensor], full: torch.Tensor) -> dict[str, np.ndarray]:
    """Float64 distance, cosine, relative distance and norm of each row against a given full gradient.

    The same arithmetic as :meth:`EpochGradients.measures`, for gradients that are
    not part of the mean (the same-parameter null's random batches).
    """
    full = full.to(torch.float64)
    full_norm = float(torch.linalg.vector_norm(full))
    out = {c: np.zeros(len(rows)) for c in GRADIENT_MEASURES}
    for i, row in enumerate(rows):
        row64 = row.to(device=full.device, dtype=torch.float64)
        norm = float(torch.linalg.vector_norm(row64))
        distance = float(torch.linalg.vector_norm(row64 - full))
        out["distance"][i], out["grad_norm"][i] = distance, norm
        out["cosine_similarity"][i] = float(torch.dot(row64, full)) / (norm * full_norm)
        out["relative_distance"][i] = distance / full_norm
    return out


# --------------------------------------------------------------------------- one epoch's gradients

GRADIENT_MEASURES = ("distance", "cosine_similarity", "relative_distance", "grad_norm")


class NonFiniteGradientError(FloatingPointError):
    """A mini-batch gradient holds NaN or infinity; the message names the batch."""


class EpochGradients:
    """The K mini-batch gradients of one epoch, kept until the full gradient is known.

    Distances need every ``g_k`` once ``g_full`` (their mean) is known, so the epoch's
    gradients are buffered: in one ``K x P`` tensor (on ``device``) when it fits in
    ``memory_cap_bytes``, otherwise appended row by row to a raw scratch file in
    ``scratch_dir`` that :meth:`close` deletes. Either way the rows are stored
    exactly, in the gradients' own dtype.

    While rows arrive, their float64 sum and norms are accumulated in arrival
    order, so :meth:`measures` needs one more pass over the rows. Both storage
    modes run the same float64 arithmetic in the same order and give identical
    results. Peak memory beyond the stored rows: three float64 vectors of length P.
    """

    def __init__(
        self,
        num_batches: int,
        num_params: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        memory_cap_bytes: float = float("inf"),
        scratch_dir: str | os.PathLike | None = None,
    ) -> None:
        if num_batches < 1 or num_params < 1:
            raise ValueError(f"Need at least one batch and one parameter, got {num_batches} x {num_params}.")
        self.num_batches = num_batches
        self.num_params = num_params
        self.dtype = dtype
        self.device = torch.device(device)
        self.nbytes = num_batches * num_params * torch.empty((), dtype=dtype).element_size()
        self._count = 0
        self._sum = torch.zeros(num_params, dtype=torch.float64, device=self.device)
        self._norms = torch.zeros(num_batches, dtype=torch.float64, device=self.device)
        self._rows: torch.Tensor | None = None
        self._scratch_path: Path | None = None
        self._scratch_file = None
        if self.nbytes <= memory_cap_bytes:
            self._rows = torch.empty(num_batches, num_params, dtype=dtype, device=self.device)
        else:
            if dtype not in _NUMPY_DTYPES:
                raise ValueError(f"Scratch files hold float32 or float64 gradients, not {dtype}.")
            folder = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
            folder.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix="epoch-gradients-", suffix=".scratch", dir=folder)
            self._scratch_path = Path(name)
            self._scratch_file = os.fdopen(handle, "wb")

    @property
    def in_memory(self) -> bool:
        return self._rows is not None

    @property
    def scratch_path(self) -> Path | None:
        return self._scratch_path

    def __len__(self) -> int:
        return self._count

    def append(self, gradient: torch.Tensor) -> None:
        """Store the next batch's flattened gradient (copied; the caller may reuse its tensor)."""
        if self._count >= self.num_batches:
            raise IndexError(f"All {self.num_batches} gradients of the epoch are already stored.")
        if gradient.shape != (self.num_params,):
            raise ValueError(f"Expected a gradient of {self.num_params} values, got {tuple(gradient.shape)}.")
        row64 = gradient.to(device=self.device, dtype=torch.float64)
        self._sum += row64
        self._norms[self._count] = torch.linalg.vector_norm(row64)
        if self._rows is not None:
            self._rows[self._count].copy_(gradient)
        else:
            gradient.detach().to("cpu", self.dtype).numpy().tofile(self._scratch_file)
        self._count += 1

    def _stored_rows(self) -> Iterator[torch.Tensor]:
        if self._rows is not None:
            yield from self._rows[: self._count]
            return
        self._scratch_file.flush()
        # Plain reads, not a memory map: mapped pages would count as this process's memory.
        with open(self._scratch_path, "rb") as stream:
            for _ in range(self._count):
                row = np.fromfile(stream, dtype=_NUMPY_DTYPES[self.dtype], count=self.num_params)
                yield torch.from_numpy(row).to(self.device)

    def full_gradient(self) -> torch.Tensor:
        """The mean of the stored gradients (float64): the full-batch gradient of equation 3."""
        if self._count != self.num_batches:
            raise RuntimeError(f"Only {self._count} of {self.num_batches} gradients were stored.")
        return self._sum / self._count

    def measures(self) -> dict[str, np.ndarray | float]:
        """Exact float64 measures of every stored gradient against their mean (see :func:`distance_measures`).

        Raises :class:`NonFiniteGradientError` naming the first batch whose gradient
        is not finite.
        """
        if self._count != self.num_batches:
            raise RuntimeError(f"Only {self._count} of {self.num_batches} gradients were stored.")
        norms = self._norms.cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(norms))
        if bad.size:
            raise NonFiniteGradientError(f"The gradient of batch {int(bad[0])} is not finite (norm {norms[bad[0]]}).")
        full = self._sum / self._count
        full_norm = torch.linalg.vector_norm(full)
        distance = torch.empty(self._count, dtype=torch.float64, device=self.device)
        dot = torch.empty(self._count, dtype=torch.float64, device=self.device)
        for k, row in enumerate(self._stored_rows()):
            row64 = row.to(torch.float64)
            distance[k] = torch.linalg.vector_norm(row64 - full)
            dot[k] = torch.dot(row64, full)
        distance_np = distance.cpu().numpy()
        full_norm_value = float(full_norm)
        return {
            "distance": distance_np,
            "cosine_similarity": dot.cpu().numpy() / (norms * full_norm_value),
            "relative_distance": distance_np / full_norm_value,
            "grad_norm": norms,
            "full_grad_norm": full_norm_value,
        }

    def close(self) -> None:
        """Free the stored rows and delete the scratch file, if any."""
        self._rows = None
        if self._scratch_file is not None:
            self._scratch_file.close()
            self._scratch_file = None
        if self._scratch_path is not None:
            self._scratch_path.unlink(missing_ok=True)
            self._scratch_path = None

    def __enter__(self) -> EpochGradients:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


class FlatGradient:
    """Points every parameter's ``.grad`` of a model at a view of one flat vector.

    ``backward()`` then accumulates straight into :attr:`vector` (in
    ``model.parameters()`` order, the order of :func:`batch_gradient`), so reading
    a batch's flattened gradient copies nothing. Call :meth:`zero` before each
    backward pass. Parameters that get no gradient keep zeros.
    """

    def __init__(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The model has no trainable parameters.")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"All parameters must share one dtype and device, got {dtypes} on {devices}.")
        self.vector = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        offset = 0
        for p in params:
            p.grad = self.vector[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self._params = params

    def zero(self) -> None:
        self.vector.zero_()

    def check_attached(self) -> None:
        """Raise if something replaced a parameter's ``.grad`` (then the vector would miss it)."""
        offset = 0
        for p in self._params:
            if p.grad is None or p.grad.data_ptr() != self.vector[offset:].data_ptr():
                raise RuntimeError("A parameter's .grad no longer views the flat gradient vector.")
            offset += p.numel()


# --------------------------------------------------------------------------- per-example gradient variance


class GradientVarianceTrace:
    """``tr(Sigma)`` of the per-example gradients at fixed parameters, accumulated batch by batch.

    ``tr(Sigma) = (1/N) sum_i ||g_i - g_mean||^2`` over the ``N`` examples added (the
    population normalisation, for which ``E||g_batch - g_full||^2 = tr(Sigma)/m *
    (N-m)/(N-1)`` holds exactly; see ``analysis.expected_batch_distance_sq``). Each
    ``g_i`` is the gradient of example ``i``'s own cross-entropy loss, computed with
    ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``), in chunks that fit
    ``max_chunk_bytes``, and accumulated as a float64 sum and sum of squares.

    The model runs in eval mode: BatchNorm normalises with the running statistics in
    ``buffers`` (by default the model's own, copied when this object is made), since a
    single example has no batch statistics. The mini-batch gradients of the probe are
    taken in training mode (batch statistics), so the sampling identity above holds
    only approximately for a network with BatchNorm. The model's mode is restored
    after each :meth:`add`; its parameters, buffers and ``.grad`` are not touched.
    """

    def __init__(self, model: nn.Module, buffers: dict[str, torch.Tensor] | None = None,
                 max_chunk_bytes: float = 2**28) -> None:
        self.model = model
        self.params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("The model has no trainable parameters.")
        self.buffers = ({name: b.detach().clone() for name, b in model.named_buffers()}
                        if buffers is None else dict(buffers))
        first = next(iter(self.params.values()))
        self.num_params = sum(p.numel() for p in self.params.values())
        self.chunk = max(1, int(max_chunk_bytes // (self.num_params * first.element_size())))
        self._sum = torch.zeros(self.num_params, dtype=torch.float64, device=first.device)
        self._sum_sq = torch.zeros((), dtype=torch.float64, device=first.device)
        self.count = 0

        def example_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(self.model, (params, self.buffers), (x.unsqueeze(0),))
            return nn.functional.cross_entropy(out, y.unsqueeze(0))

        self._per_example = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))

    def per_example_gradients(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``len(inputs) x P`` per-example gradients, flattened in ``model.parameters()`` order."""
        was_training = self.model.training
        self.model.eval()
        try:
            grads = self._per_example(self.params, inputs, targets)
        finally:
            self.model.train(was_training)
        return torch.cat([grads[name].reshape(len(inputs), -1) for name in self.params], dim=1)

    def add(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulate the per-example gradients of ``inputs`` (a batch of examples)."""
        for start in range(0, len(inputs), self.chunk):
            rows = self.per_example_gradients(inputs[start:start + self.chunk], targets[start:start + self.chunk])
            rows64 = rows.to(torch.float64)
            self._sum += rows64.sum(dim=0)
            self._sum_sq += (rows64 * rows64).sum()
            self.count += len(rows)

    def trace(self) -> float:
        """``tr(Sigma)`` of everything added so far (``(1/N) sum ||g_i||^2 - ||g_mean||^2``, in float64)."""
        if self.count == 0:
            raise RuntimeError("No examples were added.")
        mean = self._sum / self.count
        return float(self._sum_sq / self.count - torch.dot(mean, mean))
