"""The batched probe (torch.func over a batch-of-batches axis) against the sequential reference.

The two compute the same gradients at the epoch-start parameters, but vmap runs other
kernels (a grouped convolution for the stacked batches, BatchNorm's affine part after
the normalisation), so the sums are rounded in another order: they agree to rounding,
not bit for bit. Measured on the CPU (torch 2.14): float64 gradients within about 1e-14
of their largest entry for all three registered models, float32 within about 1e-5.
The tolerances below leave an order of magnitude or more over that. The training of
net_normal does not depend on the probe, so its history is bit-identical either way.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from best_minibatch.config import ConfigError
from best_minibatch.data.tensor_io import load_tensors
from best_minibatch.gradient_training import GradientProbeRun, TrainingConfig, run_identity
from best_minibatch.training.algorithm1 import GradientProbe
from best_minibatch.training.batched_probe import (
    BatchedGradients,
    batch_statistics_only,
    chunk_for_memory,
    saved_bytes_per_batch,
)
from best_minibatch.training.models import build_model
from best_minibatch.training.probing import GRADIENT_MEASURES, EpochGradients
from best_minibatch.training.recipe import TrainingRecipe
from tests.test_training import tiny_data, tiny_model  # noqa: F401  (tiny_data: a fixture)

#: (relative to the largest gradient entry, relative on the float64 distances) per dtype.
TOLERANCE = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-4, 1e-3)}


def stats_trained_model(name: str, dtype: torch.dtype) -> nn.Module:
    """A registered model whose BatchNorm running statistics are no longer the initial ones."""
    torch.manual_seed(0)
    model = build_model(name).to(dtype).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32, dtype=dtype))
    return model


def probe_epoch(net_normal: nn.Module, batches, chunk, scratch: Path):
    """One probed epoch over ``batches``; returns (measures, stored rows, buffer, net_compare, what after_step gave)."""
    num_params = sum(p.numel() for p in net_normal.parameters())
    dtype = next(net_normal.parameters()).dtype
    made = []

    def spilling_buffer(count: int) -> EpochGradients:
        made.append(EpochGradients(count, num_params, dtype, "cpu", memory_cap_bytes=0, scratch_dir=scratch))
        return made[-1]

    probe = GradientProbe(net_normal, len(batches), spilling_buffer, contextlib.nullcontext, chunk=chunk)
    probe.start_epoch(None, net_normal)
    produced = []
    for k, (inputs, targets) in enumerate(batches):
        out = probe.after_step(None, k, inputs, targets)
        produced.append([(j, row.clone()) for j, row in out] if isinstance(out, list) else out)
    buffer = made[-1]
    assert not buffer.in_memory and buffer.scratch_path.parent == scratch  # the rows went to the scratch file
    rows = torch.stack([row.clone() for row in buffer._stored_rows()])
    return probe.measures(), rows, buffer, probe.net_compare, produced


def tiny_batches(count: int, size: int, dtype: torch.dtype, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=generator, dtype=dtype),
             torch.randint(0, 10, (size,), generator=generator)) for _ in range(count)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("name", "count", "size", "chunk"), [
    ("small_cnn", 5, 4, 2),  # chunks of 2, 2 and the last 1
    ("resnet18", 2, 2, 2),
    # 34 million parameters: 1.5 to 3.5 minutes per dtype on the shared 2-core machine.
    pytest.param("dpn92", 2, 2, 2, marks=pytest.mark.slow),
])
def test_batched_probe_equals_the_sequential_probe(tmp_path, name, count, size, chunk, dtype):
    net_normal = stats_trained_model(name, dtype)
    normal_state = {k: v.clone() for k, v in net_normal.state_dict().items()}
    batches = tiny_batches(count, size, dtype)
    sequential, seq_rows, _, seq_compare, _ = probe_epoch(net_normal, batches, 0, tmp_path / "sequential")
    batched, bat_rows, buffer, bat_compare, produced = probe_epoch(net_normal, batches, chunk, tmp_path / "batched")
    grad_tol, measure_tol = TOLERANCE[dtype]

    # The stored (spilled) rows: same dtype, same order, equal to rounding.
    assert bat_rows.dtype == seq_rows.dtype == dtype and bat_rows.shape == seq_rows.shape
    scale = float(seq_rows.abs().max())
    assert float((bat_rows - seq_rows).abs().max()) <= grad_tol * scale
    # Rows differ between batches by far more than the tolerance (the comparison can fail).
    assert float((seq_rows[0] - seq_rows[1]).abs().max()) > 1e3 * grad_tol * scale
    for column in GRADIENT_MEASURES:
        np.testing.assert_allclose(batched[column], sequential[column], rtol=measure_tol, atol=0)
    assert batched["full_grad_norm"] == pytest.approx(sequential["full_grad_norm"], rel=measure_tol)
    assert buffer.scratch_path is None  # measures() deleted the scratch file

    # The batched probe hands back each step's gradient once, in step order, when its chunk is computed.
    flushed = [j for out in produced if out is not None for j, _ in out]
    assert flushed == list(range(count))
    assert [out is not None for out in produced] == [(k + 1) % chunk == 0 or k == count - 1 for k in range(count)]

    # Running statistics: net_normal's untouched by both; the batched net_compare's still the epoch-start ones,
    # while the sequential forward passes moved its own (so this check can tell).
    for key, value in net_normal.state_dict().items():
        assert torch.equal(value, normal_state[key]), key
    running = [k for k in normal_state if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert running
    for key in running:
        assert torch.equal(bat_compare.state_dict()[key], normal_state[key]), key
    assert any(not torch.equal(seq_compare.state_dict()[key], normal_state[key]) for key in running)
    assert all(m.track_running_stats for m in bat_compare.modules() if isinstance(m, nn.BatchNorm2d))


def test_null_measures_and_measures_compute_the_queue_first():
    net_normal = stats_trained_model("small_cnn", torch.float64)
    batches = tiny_batches(4, 4, torch.float64)
    extra = tiny_batches(2, 4, torch.float64, seed=7)
    results = {}
    for chunk in (0, 8):  # a chunk larger than the epoch: nothing is computed before the last step
        probe = GradientProbe(net_normal, len(batches), lambda n: EpochGradients(n, sum(
            p.numel() for p in net_normal.parameters()), torch.float64), contextlib.nullcontext, chunk=chunk)
        probe.start_epoch(None, net_normal)
        for k, (x, y) in enumerate(batches[:-1]):
            probe.after_step(None, k, x, y)
        if chunk:
            assert len(probe.queue) == 3 and len(probe.buffer) == 0
        probe.after_step(None, 3, *batches[-1])
        assert not probe.queue and len(probe.buffer) == 4
        results[chunk] = (probe.null_measures(iter(extra)), probe.measures())
    (null_s, meas_s), (null_b, meas_b) = results[0], results[8]
    for column in GRADIENT_MEASURES:
        np.testing.assert_allclose(null_b[column], null_s[column], rtol=1e-10, atol=0)
        np.testing.assert_allclose(meas_b[column], meas_s[column], rtol=1e-10, atol=0)
        assert len(null_b[column]) == 2


def test_batched_gradients_need_training_mode_and_matching_shapes():
    model = stats_trained_model("small_cnn", torch.float32)
    probe = BatchedGradients(model)
    with pytest.raises(ValueError, match="first two"):
        probe(torch.randn(2, 3, 3, 32, 32), torch.zeros(2, 4, dtype=torch.long))
    model.eval()
    with pytest.raises(RuntimeError, match="training mode"):
        probe(torch.randn(2, 3, 3, 32, 32), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk"):
        BatchedGradients(model, chunk=0)
    with pytest.raises(ValueError, match="chunk"):
        GradientProbe(model, 2, lambda n: None, contextlib.nullcontext, chunk=-1)


def test_batch_statistics_only_leaves_running_buffers_alone_and_restores_the_flag():
    model = stats_trained_model("small_cnn", torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with batch_statistics_only(model):
        model(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model(torch.randn(4, 3, 32, 32))  # an ordinary training-mode pass does move them
    assert not torch.equal(model.state_dict()["1.running_mean"], before["1.running_mean"])


def test_chunk_from_free_memory():
    # Two batches' activations and three gradient rows per batch, against half the free memory.
    assert chunk_for_memory(1000, 100, 4, free_bytes=2 * 10 * (2 * 1000 + 3 * 400)) == 10
    assert chunk_for_memory(1e12, 100, 4, free_bytes=1e9) == 1  # at least one batch
    assert chunk_for_memory(1, 1, 4, free_bytes=1e12) == 64  # at most MAX_CHUNK
    model = stats_trained_model("small_cnn", torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    small = saved_bytes_per_batch(model, torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))
    large = saved_bytes_per_batch(model, torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.long))
    assert small > 8 * 3 * 32 * 32 * 4  # at least the first conv's input is saved
    assert 1.8 < large / small < 2.2  # activations scale with the batch
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    probe = BatchedGradients(model)
    chosen = probe.choose_chunk(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long), free_bytes=1e9)
    assert chosen == probe.chunk == chunk_for_memory(small, probe.num_params, 4, 1e9)


# --------------------------------------------------------------------------- the parameter and a whole run


def test_probe_chunk_parameter_is_checked():
    assert TrainingRecipe.from_params({}).probe_chunk == 0
    assert TrainingRecipe.from_params({"probe_chunk": "auto"}).probe_chunk == "auto"
    assert TrainingRecipe.from_params({"probe_chunk": 0}, {"probe_chunk": 8},
                                      override_path="gradient_training.training").probe_chunk == 8
    for bad in (-1, "fast", 2.5, True):
        with pytest.raises(ConfigError, match=r"training\.probe_chunk"):
            TrainingRecipe.from_params({"probe_chunk": bad})


def make_config(tmp_path: Path, probe_chunk) -> TrainingConfig:
    training = {"model": {"name": "small_cnn"}, "phases": [{"epochs": 2, "lr": 0.05}, {"epochs": 1, "lr": 0.01}],
                "cpu_threads": 1, "progress_bar": False, "probe_chunk": probe_chunk}
    return TrainingConfig.from_params({"checkpoint_dir": str(tmp_path / "checkpoints"),
                                       "gradients_dir": str(tmp_path / "gradients"), "spill_dtype": "float64",
                                       "null_batches": 2, "gradient_buffer": {"memory_cap_gb": 0,
                                                                              "scratch_dir": str(tmp_path / "s")}},
                                      training)


def test_a_short_training_with_the_batched_probe_matches_the_sequential_one(tmp_path, tiny_data):  # noqa: F811
    finished = {}
    for chunk in (0, 5):  # 12 batches: chunks of 5, 5 and 2
        run = GradientProbeRun(make_config(tmp_path / str(chunk), chunk), tiny_data, tiny_model, "intensity")
        run.run()
        spilled = {(epoch, batch): load_tensors(run.gradient_path(epoch, batch))
                   for epoch in sorted(run.kept_epochs) for batch in range(tiny_data.num_batches)}
        finished[chunk] = (run, spilled)
    (seq, seq_spilled), (bat, bat_spilled) = finished[0], finished[5]
    assert seq.run_name != bat.run_name  # the batched probe is part of the run's identity
    # net_normal's training does not depend on the probe: bit-identical.
    history = ["train_loss", "train_accuracy", "test_loss", "test_accuracy"]
    assert seq.results.history[history].equals(bat.results.history[history])
    # Every kept gradient, spilled in float64, and every distance agree to float64 rounding.
    assert sorted(bat_spilled) == sorted(seq_spilled) and len(seq_spilled) == 3 * tiny_data.num_batches
    for key, gradient in seq_spilled.items():
        assert gradient.dtype == torch.float64
        torch.testing.assert_close(bat_spilled[key], gradient, rtol=0, atol=1e-12 * float(gradient.abs().max()))
    a, b = seq.results.distances, bat.results.distances
    assert a[["epoch", "batch"]].equals(b[["epoch", "batch"]])
    for column in ("distance", "cosine_similarity", "relative_distance", "grad_norm", "full_grad_norm"):
        np.testing.assert_allclose(b[column].to_numpy(), a[column].to_numpy(), rtol=1e-10, atol=0)
    null_a, null_b = seq.results.null_distances, bat.results.null_distances
    assert len(null_a) == 3 * 2
    np.testing.assert_allclose(null_b["distance"].to_numpy(), null_a["distance"].to_numpy(), rtol=1e-10, atol=0)
    assert all(math.isfinite(d) for d in a["distance"])


def test_sequential_runs_keep_their_identity():
    config = make_config(Path("unused"), 0)
    identity = run_identity(config, "intensity", 10, torch.float64, None)
    assert "probe_batched" not in identity
    batched = run_identity(make_config(Path("unused"), "auto"), "intensity", 10, torch.float64, None)
    assert batched == {**identity, "probe_batched": True}
