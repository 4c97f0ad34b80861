"""The one training loop: epochs of SGD over the batches a caller supplies, with hooks.

Knows nothing of Kedro. Both experiments train through :func:`train_epochs`:
``gradient_training`` (Algorithm 1: the probe is an :class:`EpochHook`, see
``algorithm1.py``) and ``batch_selection`` (each policy supplies the epoch's
batches; the oracle probes at the epoch start through the same probe). The loop
sets each phase's learning rate, takes the optimizer steps, calls the hook, checks
that the loss stays finite, and evaluates ``recipe.evaluations_per_epoch`` times
per epoch on the data the caller gives. Resuming, checkpoints and disk checks
belong to the caller (``best_minibatch.gradient_training``), not to the loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from best_minibatch.training.recipe import EpochPlan, TrainingRecipe

Batch = tuple[torch.Tensor, torch.Tensor]


class DivergenceError(FloatingPointError):
    """The loss or a gradient became NaN or infinite; the message names where and the fix."""


class EpochHook:
    """What an experiment plugs into the loop; every method is optional (the defaults do nothing)."""

    def start_epoch(self, plan: EpochPlan, model: nn.Module) -> None:
        """Before the epoch's first step, at the epoch-start parameters."""

    def after_step(self, plan: EpochPlan, k: int, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
        """After step ``k``'s update, with the inputs it trained on; a non-``None`` result is yielded (a list: each item)."""
        return None

    def end_epoch(self, plan: EpochPlan) -> None:
        """After the epoch's last step, before its last evaluation."""


@dataclass
class Evaluation:
    """One evaluation: where in training, the mean training loss since the previous one, and the scores."""

    plan: EpochPlan
    step: int  # optimizer steps taken so far, over all epochs
    train_loss: float  # torch mean (float64) of the batch losses since the previous evaluation
    loss: float
    accuracy: float


@dataclass
class EpochResult:
    """An epoch's training statistics (the last evaluation is the epoch's)."""

    plan: EpochPlan
    batch_losses: np.ndarray  # float64, one per step
    train_accuracy: float
    seconds: float  # steps, probing and the batches callable; evaluations excluded
    evaluations: list[Evaluation] = field(default_factory=list)

    @property
    def train_loss(self) -> float:
        return float(self.batch_losses.mean())


@dataclass
class LoopState:
    """Counters over the whole run, readable by callbacks."""

    step: int = 0
    seconds: float = 0.0


def evaluation_steps(steps_per_epoch: int, evaluations: int) -> set[int]:
    """0-based step indices within an epoch after which to evaluate (the last step always)."""
    return {max(0, int(round(steps_per_epoch * j / evaluations)) - 1) for j in range(1, evaluations + 1)}


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    recipe: TrainingRecipe,
    plans: Sequence[EpochPlan],
    batches: Callable[[EpochPlan], Sequence[Batch] | Iterable[Batch]],
    num_steps: Callable[[EpochPlan], int],
    *,
    evaluate: Callable[[nn.Module], tuple[float, float]] | None = None,
    hook: EpochHook | None = None,
    on_epoch_start: Callable[[EpochPlan], None] | None = None,
    on_evaluation: Callable[[Evaluation, LoopState], None] | None = None,
    on_epoch_end: Callable[[EpochResult, LoopState], None] | None = None,
    divergence: Callable[[EpochPlan, int, str], str] | None = None,
    label: str = "",
    state: LoopState | None = None,
) -> Iterator[Any]:
    """Train ``model`` for ``plans``; yield what the hook's ``after_step`` returns (a list's items one by one).

    ``batches(plan)`` gives the epoch's ``num_steps(plan)`` (inputs, targets) pairs,
    already on the model's device. ``evaluate(model)`` returns (loss, accuracy) and
    runs ``recipe.evaluations_per_epoch`` times per epoch, the last after the last
    step. ``on_epoch_start(plan)`` runs before anything of the epoch (a disk check, a
    clock). ``divergence(plan, k, what)`` words the error of a non-finite loss.
    """
    hook = hook or EpochHook()
    state = state or LoopState()
    device = next(model.parameters()).device
    total = plans[-1].epoch if plans else 0
    for plan in plans:
        if on_epoch_start is not None:
            on_epoch_start(plan)
        _sync(device)
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = plan.learning_rate
        model.train()
        hook.start_epoch(plan, model)
        count = num_steps(plan)
        evaluate_after = evaluation_steps(count, recipe.evaluations_per_epoch)
        losses = torch.zeros(count, dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        result = EpochResult(plan, np.zeros(0), math.nan, 0.0)
        since = 0  # first step not yet covered by an evaluation
        with progress_bar(recipe.progress_bar, f"{label} epoch {plan.epoch}/{total}".strip(), count) as advance:
            for k, (inputs, targets) in enumerate(batches(plan)):
                # An ordinary SGD step (Algorithm 1, lines 8-11).
                optimizer.zero_grad(set_to_none=True)
                with recipe.autocast():
                    outputs = model(inputs)
                    loss = nn.functional.cross_entropy(outputs, targets)
                loss.backward()
                optimizer.step()
                losses[k] = loss.detach()
                correct += (outputs.detach().argmax(dim=1) == targets).sum()
                state.step += 1
                produced = hook.after_step(plan, k, inputs, targets)
                if isinstance(produced, list):
                    yield from produced
                elif produced is not None:
                    yield produced
                advance()
                if k in evaluate_after:
                    _check_finite(losses, since, k + 1, plan, divergence)
                    if k == count - 1:
                        hook.end_epoch(plan)
                    chunk_loss = float(losses[since:k + 1].mean())
                    since = k + 1
                    _sync(device)
                    state.seconds += time.perf_counter() - started
                    result.seconds += time.perf_counter() - started
                    if evaluate is not None:
                        loss_value, accuracy = evaluate(model)
                        evaluation = Evaluation(plan, state.step, chunk_loss, loss_value, accuracy)
                        result.evaluations.append(evaluation)
                        if on_evaluation is not None:
                            on_evaluation(evaluation, state)
                    started = time.perf_counter()
        result.batch_losses = losses.cpu().numpy()
        result.train_accuracy = int(correct) / (count * int(inputs.shape[0])) if count else math.nan
        if on_epoch_end is not None:
            on_epoch_end(result, state)


def _check_finite(losses: torch.Tensor, start: int, stop: int, plan: EpochPlan,
                  divergence: Callable[[EpochPlan, int, str], str] | None) -> None:
    chunk = losses[start:stop].cpu().numpy()
    if not np.isfinite(chunk).all():
        bad = int(np.flatnonzero(~np.isfinite(chunk))[0])
        what = f"training loss {chunk[bad]}"
        message = (divergence(plan, start + bad, what) if divergence is not None else
                   f"Epoch {plan.epoch}, batch {start + bad}: {what} is not finite. Lower the learning rate.")
        raise DivergenceError(message)


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[Batch],
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> tuple[float, float]:
    """Mean cross-entropy (summed in float64) and accuracy in eval mode; restores the model's mode."""
    was_training = model.training
    model.eval()
    total_loss = None
    correct = n = 0
    for inputs, targets in batches:
        with autocast():
            outputs = model(inputs)
        loss = nn.functional.cross_entropy(outputs.double(), targets, reduction="sum")
        total_loss = loss if total_loss is None else total_loss + loss
        correct += (outputs.argmax(dim=1) == targets).sum()
        n += len(targets)
    model.train(was_training)
    if n == 0:
        return math.nan, math.nan
    return float(total_loss) / n, int(correct) / n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def progress_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar on the console Kedro's log handler uses; a no-op when output is not a terminal."""
    import rich
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = rich.get_console()
    if not enabled or not console.is_terminal:
        yield lambda: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
