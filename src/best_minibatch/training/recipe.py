"""The one SGD recipe every experiment trains with: model, phases, optimizer, augmentation, device.

Knows nothing of Kedro. ``conf/base/parameters.yml`` holds it once under
``training``; ``gradient_training`` and ``batch_selection`` read it and may
override keys under their own ``training:`` (``batch_selection`` trains for more
epochs, for instance). :meth:`TrainingRecipe.from_params` checks every value and
names the parameter's full path in its :class:`~best_minibatch.config.ConfigError`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from best_minibatch.config import ConfigError, Section, deep_merge
from best_minibatch.training.models import MODELS, build_model
from best_minibatch.training.runtime import DEVICES, cpu_threads, deterministic_algorithms, gpu_slot, resolve_device

#: ``probe_chunk: auto``: the batched probe with its chunk chosen from free memory.
PROBE_CHUNK_AUTO = "auto"

RECIPE_KEYS = ("model", "phases", "momentum", "weight_decay", "augment", "batch_size", "device", "bf16_autocast",
               "deterministic", "cpu_threads", "eval_batch_size", "evaluations_per_epoch", "progress_bar", "probe_chunk")


class EpochPlan(NamedTuple):
    """One epoch of the schedule: 1-based epoch and phase, and the phase's learning rate."""

    epoch: int
    phase: int
    learning_rate: float


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything that says how a network is trained, shared by every experiment."""

    model: str = "small_cnn"
    model_options: tuple[tuple[str, Any], ...] = ()
    phases: tuple[tuple[int, float], ...] = ((3, 0.1), (3, 0.01), (3, 0.001))
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False
    batch_size: int | None = None  # None: the batch size sort_batches cuts (a checked rule, see hooks)
    device: str = "auto"
    bf16_autocast: bool = False
    deterministic: bool = True
    cpu_threads: int | None = None
    eval_batch_size: int = 500
    evaluations_per_epoch: int = 1
    progress_bar: bool = True
    probe_chunk: int | str = 0  # 0: the sequential probe; auto or N: the batched probe (algorithm1.GradientProbe)

    @classmethod
    def from_params(cls, shared: Mapping[str, Any] | None, override: Mapping[str, Any] | None = None, *,
                    override_path: str = "", error_type: type[ConfigError] = ConfigError,
                    where: str | None = None) -> TrainingRecipe:
        """The ``training`` section, with an experiment's ``<section>.training`` overrides laid over it."""
        Section(shared, "training", RECIPE_KEYS, error_type, where)  # unknown keys of each part are errors
        if override is not None:
            Section(override, override_path, RECIPE_KEYS, error_type, where)
        merged = deep_merge(shared or {}, override)
        section = _MergedSection(merged, "training", override_path, override or {}, error_type, where)
        model = section.section("model", ("name", *MODELS))
        name = model.choice("name", cls.model, sorted(MODELS))
        for other in sorted(set(model.params) - {"name"}):
            if model.get(other) is not None and not isinstance(model.get(other), Mapping):
                raise model.error(other, f"expected a mapping of {other}'s options, got {model.get(other)!r}",
                                  "Write e.g. small_cnn: {width: 8}.")
        # Options sit under the model's own name so that an environment switching the model
        # (conf/paper: dpn92) does not inherit another model's options when parameters merge softly.
        options = dict(model.get(name) or {})
        accepted = set(inspect.signature(MODELS[name]).parameters) - {"num_classes"}
        if unknown := sorted(set(options) - accepted):
            raise model.error(f"{name}.{unknown[0]}", f"{name} does not take this option",
                              f"It takes {sorted(accepted) or 'no options'}.")
        device = section.choice("device", cls.device, DEVICES)
        try:
            resolve_device(device)
        except ValueError as error:
            raise section.error("device", str(error), "Use device: auto (CUDA when present, else CPU) or "
                                "device: cpu.") from error
        return cls(
            model=name,
            model_options=tuple(sorted(options.items())),
            phases=_phases(section),
            momentum=section.number("momentum", cls.momentum, "The paper uses 0.9.", low=0),
            weight_decay=section.number("weight_decay", cls.weight_decay, "The paper uses 5e-4.", low=0),
            augment=section.boolean("augment", cls.augment),
            batch_size=section.integer("batch_size", None, 2, "Use e.g. 100 (BatchNorm needs at least 2 images), "
                                       "or null for sort_batches.batch_size.", optional=True),
            device=device,
            bf16_autocast=section.boolean("bf16_autocast", cls.bf16_autocast),
            deterministic=section.boolean("deterministic", cls.deterministic,
                                          "Use true for bit-for-bit CPU reruns."),
            cpu_threads=section.integer("cpu_threads", None, 1, "Use null (torch's default) or e.g. 1.",
                                        optional=True),
            eval_batch_size=section.integer("eval_batch_size", cls.eval_batch_size, 1, "Use e.g. 500."),
            evaluations_per_epoch=section.integer("evaluations_per_epoch", cls.evaluations_per_epoch, 1,
                                                  "Use e.g. 1 or 2."),
            progress_bar=section.boolean("progress_bar", cls.progress_bar),
            probe_chunk=(PROBE_CHUNK_AUTO if section.get("probe_chunk") == PROBE_CHUNK_AUTO else
                         section.integer("probe_chunk", cls.probe_chunk, 0,
                                         f"Use 0 (the sequential probe), {PROBE_CHUNK_AUTO} (batched, the chunk "
                                         "chosen from free memory) or a number of batches per call, e.g. 8.")),
        )

    # ------------------------------------------------------------------ derived

    @property
    def num_epochs(self) -> int:
        return sum(epochs for epochs, _ in self.phases)

    @property
    def num_phases(self) -> int:
        return len(self.phases)

    @property
    def schedule(self) -> list[EpochPlan]:
        """Epochs 1..E with their phase and learning rate."""
        plans: list[EpochPlan] = []
        for phase, (epochs, lr) in enumerate(self.phases, start=1):
            plans.extend(EpochPlan(len(plans) + 1, phase, float(lr)) for _ in range(epochs))
        return plans

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def model_factory(self, num_classes: int = 10) -> Callable[[], nn.Module]:
        """A builder of the recipe's model (``best_minibatch.training.models``)."""
        options = dict(self.model_options)
        return lambda: build_model(self.model, num_classes, **options)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA when asked for; a no-op elsewhere."""
        if self.bf16_autocast and self.resolved_device().type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """SGD with the recipe's momentum and weight decay, at the first phase's learning rate."""
        return torch.optim.SGD(model.parameters(), lr=self.phases[0][1], momentum=self.momentum,
                               weight_decay=self.weight_decay)


class _MergedSection(Section):
    """The merged recipe (or a mapping in it), naming each key where the user wrote it.

    A key the experiment's override sets (``gradient_training.training.model.name``) is named
    under the override; any other key, although merged with the override's, under the shared
    ``training`` section: a bad shared ``training.model.name`` is not blamed on an override that
    only sets ``model.small_cnn``.
    """

    def __init__(self, params: Any, shared_path: str, override_path: str, override: Any,
                 error_type: type[ConfigError], where: str | None, known=RECIPE_KEYS) -> None:
        self.override_path, self.override = override_path, override  # before the checks, which name keys
        super().__init__(params, shared_path, known, error_type, where)

    def key(self, name: str) -> str:
        if self.override_path and _written(self.override, name):
            return f"{self.override_path}.{name}" if name else self.override_path
        return super().key(name)

    def section(self, name: str, known) -> Section:
        override = self.override.get(name, _UNSET) if isinstance(self.override, Mapping) else _UNSET
        return _MergedSection(self.params.get(name), super().key(name), f"{self.override_path}.{name}", override,
                              self.error_type, self.where, known)


_UNSET = object()


def _written(override: Any, name: str) -> bool:
    """Whether the override sets ``name`` (``a.b``, ``a[0].b``; ``""``: the override itself)."""
    if override is _UNSET:
        return False
    for part in name.split(".") if name else ():
        if not isinstance(override, Mapping) or part.split("[")[0] not in override:
            return False
        if "[" in part:  # a list is written whole
            return True
        override = override[part]
    return True


def _phases(section: Section) -> tuple[tuple[int, float], ...]:
    phases = section.get("phases", [{"epochs": e, "lr": lr} for e, lr in TrainingRecipe.phases])
    if not isinstance(phases, (list, tuple)) or not phases:
        raise section.error("phases", f"expected a non-empty list of {{epochs, lr}}, got {phases!r}",
                            "Write e.g. [{epochs: 3, lr: 0.1}, {epochs: 3, lr: 0.01}].")
    parsed, problems = [], []
    for i, phase in enumerate(phases):
        if not isinstance(phase, Mapping) or set(phase) != {"epochs", "lr"}:
            problems.append(section.error(f"phases[{i}]", f"expected {{epochs: N, lr: X}}, got {phase!r}",
                                          "Each phase needs exactly the keys epochs and lr."))
            continue
        one = Section(phase, section.key(f"phases[{i}]"), ("epochs", "lr"), section.error_type, section.where)
        try:
            epochs = one.integer("epochs", None, 1, "Set how many epochs the phase lasts (1 or more).")
            lr = one.number("lr", None, "Set the phase's learning rate, e.g. 0.1.", low=0, low_open=True)
            parsed.append((epochs, lr))
        except ConfigError as error:
            problems.append(error)
    if len(problems) == 1:
        raise problems[0]
    if problems:  # every bad phase at once, not only the first
        raise section.error_type(section.key("phases"), f"{len(problems)} phases are wrong: "
                                 + "; ".join(str(p).removeprefix("Parameter ") for p in problems),
                                 "Fix each of them.", section.where)
    return tuple(parsed)


@contextlib.contextmanager
def training_environment(recipe: TrainingRecipe) -> Iterator[None]:
    """The one device and thread setup every experiment trains under (the recipe's determinism and threads).

    On a CUDA device the training also gets a GPU of its own (:func:`~best_minibatch.training.runtime.gpu_slot`).
    """
    device = recipe.resolved_device()
    with gpu_slot(device), deterministic_algorithms(recipe.deterministic, device), cpu_threads(recipe.cpu_threads):
        yield
