"""Gradient probing: the flat gradient vector, the epoch buffer, exact distances."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from best_minibatch.training.probing import (
    EpochGradients,
    FlatGradient,
    NonFiniteGradientError,
    batch_gradient,
    distance_measures,
)


def tiny_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def brute_force_measures(rows: np.ndarray) -> dict[str, np.ndarray | float]:
    """Independent reference: Python floats and math.fsum, one element at a time."""
    k_count, p_count = rows.shape
    full = [math.fsum(rows[:, j]) / k_count for j in range(p_count)]
    full_norm = math.sqrt(math.fsum(v * v for v in full))
    out = {"distance": [], "cosine_similarity": [], "relative_distance": [], "grad_norm": []}
    for row in rows.tolist():
        dist = math.sqrt(math.fsum((a - b) ** 2 for a, b in zip(row, full)))
        norm = math.sqrt(math.fsum(a * a for a in row))
        out["distance"].append(dist)
        out["grad_norm"].append(norm)
        out["relative_distance"].append(dist / full_norm)
        out["cosine_similarity"].append(math.fsum(a * b for a, b in zip(row, full)) / (norm * full_norm))
    return {**{k: np.array(v) for k, v in out.items()}, "full_grad_norm": full_norm}


def test_flat_gradient_equals_batch_gradient_and_accumulates_after_zero():
    model = tiny_bn_model()
    probe = copy.deepcopy(model)
    flat = FlatGradient(probe)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    for _ in range(3):  # zero() before each backward: repeated passes give the same vector
        flat.zero()
        nn.functional.cross_entropy(probe(x), y).backward()
    flat.check_attached()
    expected = batch_gradient(copy.deepcopy(model), x, y)
    assert flat.vector.shape == (sum(p.numel() for p in model.parameters()),)
    torch.testing.assert_close(flat.vector, expected, rtol=0, atol=1e-6)
    assert flat.vector.abs().sum() > 0


def test_flat_gradient_detects_a_replaced_grad():
    model = tiny_bn_model()
    flat = FlatGradient(model)
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    with pytest.raises(RuntimeError, match="no longer views"):
        flat.check_attached()


@pytest.mark.parametrize("in_memory", [True, False])
def test_epoch_gradients_match_brute_force(tmp_path, in_memory):
    rows = torch.randn(9, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.3
    cap = float("inf") if in_memory else 0
    with EpochGradients(9, 37, torch.float64, memory_cap_bytes=cap, scratch_dir=tmp_path) as buffer:
        for row in rows:
            buffer.append(row)
        assert buffer.in_memory is in_memory
        scratch = buffer.scratch_path
        got = buffer.measures()
    expected = brute_force_measures(rows.numpy())
    for key in ("distance", "cosine_similarity", "relative_distance", "grad_norm"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-12)
    assert got["full_grad_norm"] == pytest.approx(expected["full_grad_norm"], rel=1e-12)
    if not in_memory:
        assert scratch is not None and not scratch.exists(), "close() must delete the scratch file"
    assert list(tmp_path.iterdir()) == []


def test_memory_and_scratch_buffers_give_identical_bits(tmp_path):
    rows = torch.randn(12, 1000, generator=torch.Generator().manual_seed(2))
    results = []
    for cap in (float("inf"), 0):
        with EpochGradients(12, 1000, torch.float32, memory_cap_bytes=cap, scratch_dir=tmp_path) as buffer:
            for row in rows:
                buffer.append(row)
            results.append(buffer.measures())
    for key in ("distance", "cosine_similarity", "relative_distance", "grad_norm"):
        assert np.array_equal(results[0][key], results[1][key])
    assert results[0]["full_grad_norm"] == results[1]["full_grad_norm"]
    reference = distance_measures(rows)
    np.testing.assert_allclose(results[0]["distance"], reference["distance"], rtol=1e-12)


def test_buffer_stores_a_copy_not_the_callers_tensor():
    vector = torch.ones(5)
    with EpochGradients(2, 5) as buffer:
        buffer.append(vector)
        vector.mul_(3)  # the caller reuses its vector, as the flat gradient does
        buffer.append(vector)
        got = buffer.measures()
    np.testing.assert_allclose(got["grad_norm"], [math.sqrt(5), 3 * math.sqrt(5)])


def test_non_finite_gradient_names_the_batch():
    with EpochGradients(3, 4) as buffer:
        buffer.append(torch.ones(4))
        buffer.append(torch.tensor([1.0, float("nan"), 0.0, 0.0]))
        buffer.append(torch.ones(4))
        with pytest.raises(NonFiniteGradientError, match="batch 1"):
            buffer.measures()


def test_buffer_refuses_wrong_shapes_too_many_rows_and_early_measures():
    with EpochGradients(1, 4) as buffer:
        with pytest.raises(RuntimeError, match="Only 0 of 1"):
            buffer.measures()
        with pytest.raises(ValueError, match="4 values"):
            buffer.append(torch.ones(5))
        buffer.append(torch.ones(4))
        with pytest.raises(IndexError):
            buffer.append(torch.ones(4))
