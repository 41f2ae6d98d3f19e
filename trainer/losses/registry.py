"""The student's losses by name: each module of ``trainer/losses`` registers one, config and all.

A loss module holds its config dataclass (the YAML section ``losses.<key>``), and a
``StudentLoss`` subclass whose constructor builds the loss for a run and whose ``terms`` method
computes its weighted terms from the step's tensors (``StudentStep``). The class statement
registers it: ``class VSDTerm(StudentLoss, key="vsd", config=VSDLossConfig)``. The student stage
loops over the enabled losses, and the ``losses:`` section of the config accepts exactly the
registered keys (``LossesConfig``), so a typo is still rejected at start-up with the valid keys.
A config may subclass ``LossConfig`` to declare its fields' bounds (``at_least``, ``timestep``). A
loss that trains a model of its own (VSD's fake UNet, a discriminator) says so in ``own_model``
and takes that model's step in ``after_step``.

Losses are built, and their terms added up, in the order they register, which is the order
``trainer/losses/__init__.py`` imports their modules. That order is kept on purpose: building a
loss may draw random numbers (a discriminator's first weights, an adapter's), so a reordered
list would train a committed config differently. A new loss goes at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from ..config_loading import ConfigError, sections_from_dict

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..diffusion import LatentDiffusion

__all__ = [
    "LOSSES",
    "LossConfig",
    "LossContext",
    "LossesConfig",
    "OwnModel",
    "StudentLoss",
    "StudentStep",
    "Terms",
    "at_least",
    "build_losses",
    "timestep",
]

Terms = dict[str, tuple[float, torch.Tensor]]
"""Logged name -> (weight, unweighted value) of a loss's terms in one step."""
Optimize = Callable[[str, torch.Tensor], float]
TargetFn = Callable[["StudentStep"], torch.Tensor]
T = TypeVar("T")

LOSSES: dict[str, type[StudentLoss]] = {}
"""Every registered loss by its YAML key, in registration order (the build and sum order)."""


def at_least(low: float, default: float) -> Any:
    """A ``LossConfig`` field that must be >= ``low``, checked on construction."""
    return field(default=default, metadata={"min": low})


def timestep(default: int) -> Any:
    """A ``LossConfig`` noise level: the pair ``t_min``, ``t_max`` (declared in this order) must satisfy
    0 <= t_min <= t_max <= 999."""
    return field(default=default, metadata={"timestep": True})


@dataclass
class LossConfig:
    """Base of the losses' config dataclasses: their bounds are declared on the fields (``at_least``,
    ``timestep``) and checked here, so a bad YAML value fails at start-up with the field named."""

    def __post_init__(self) -> None:
        levels = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "min" in f.metadata and value < f.metadata["min"]:
                raise ValueError(f"{f.name} must be >= {f.metadata['min']}, got {value}")
            if f.metadata.get("timestep"):
                levels.append(value)
        if levels and not 0 <= levels[0] <= levels[-1] <= 999:
            raise ValueError(f"t_min/t_max must satisfy 0 <= t_min <= t_max <= 999, got {levels[0]}, {levels[-1]}")


@dataclass(eq=False)
class StudentStep:
    """One training step's tensors as the losses read them; images in [-1, 1], ``lr`` in [0, 1].

    The frozen models' latents are made on first use and kept for the step, so each loss asks for
    what it needs, and nothing is encoded that no enabled loss reads.
    """

    step: int
    generator: torch.Generator
    hr: torch.Tensor
    lr: torch.Tensor
    """The LR batch as the data gives it (an SR teacher's input)."""
    lr_up: torch.Tensor
    """The student's input: LR upscaled to the HR size."""
    sr: torch.Tensor
    z_sr: torch.Tensor
    prior: LatentDiffusion | None
    teacher: LatentDiffusion | None
    targets: Mapping[str, TargetFn] = field(default_factory=dict)
    _made: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def once(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()`` the first time ``key`` is asked for in this step, the same tensor after."""
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def target(self, key: str) -> torch.Tensor:
        """The image loss ``key`` compares SR with: HR, unless a loss supplies another
        (``LossContext.supply_target``: the SR teacher's output)."""
        make = self.targets.get(key)
        return self.hr if make is None else make(self)

    @torch.no_grad()
    def prior_latent(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` encoded by the frozen prior; HR's once per step."""
        return self.z_hr if image is self.hr else self.prior.encode(image)

    @cached_property
    def z_hr(self) -> torch.Tensor:
        with torch.no_grad():
            return self.prior.encode(self.hr)

    @cached_property
    def z_lr_prior(self) -> torch.Tensor | None:
        """The prior's condition: its latent of the student's input when it is LR-conditioned (a
        teacher), None for a text-conditioned base."""
        if self.prior is None or not self.prior.lr_conditioned:
            return None
        with torch.no_grad():
            return self.prior.encode(self.lr_up)

    @cached_property
    def z_lr_teacher(self) -> torch.Tensor:
        if self.teacher is self.prior:
            return self.z_lr_prior
        with torch.no_grad():
            return self.teacher.encode(self.lr_up)


@dataclass(eq=False)
class LossContext:
    """What a loss's constructor may use: the run's config, the device and the frozen models."""

    cfg: TrainConfig
    device: torch.device
    prior: LatentDiffusion | None
    teacher: LatentDiffusion | None
    targets: dict[str, TargetFn] = field(default_factory=dict)
    _shared: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def need_prior(self, what: str) -> LatentDiffusion:
        if self.prior is None:
            raise ConfigError(
                f"{what} needs a frozen diffusion prior: "
                "set student.teacher (prior: teacher) or student.base (prior: base)"
            )
        return self.prior

    def enabled(self, key: str) -> bool:
        """Whether the config switches loss ``key`` on (for a loss whose options name another)."""
        return LOSSES[key].enabled(self.cfg.losses[key])

    def shared(self, key: str, make: Callable[[], T]) -> T:
        """One object for every loss that asks for ``key`` (the frozen CLIP judge), made on the first ask."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def supply_target(self, key: str, make: TargetFn) -> None:
        """Loss ``key`` is to compare SR with ``make(step)`` instead of HR (see ``StudentStep.target``)."""
        self.targets[key] = make


@dataclass(eq=False)
class OwnModel:
    """A model a loss trains beside the student with its own AdamW (VSD's fake UNet, a discriminator).

    ``name`` names the optimizer and the module in checkpoints. The stage prepares
    ``getattr(owner, attr)`` for accelerate in place, as it does the student's own parts.
    """

    name: str
    owner: nn.Module
    attr: str
    params: list[nn.Parameter]
    lr: float

    @property
    def module(self) -> nn.Module:
        return getattr(self.owner, self.attr)


class StudentLoss:
    """Base of the student's losses; a subclass names its YAML key and config dataclass:
    ``class HFPTerm(StudentLoss, key="hfp", config=HFPLossConfig)``."""

    key: ClassVar[str]
    config_class: ClassVar[type]

    def __init_subclass__(cls, *, key: str, config: type, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if key in LOSSES:
            raise TypeError(f"two losses register as {key!r}: {LOSSES[key].__qualname__} and {cls.__qualname__}")
        if not dataclasses.is_dataclass(config):
            raise TypeError(f"the config of loss {key!r} must be a dataclass, got {config!r}")
        cls.key, cls.config_class = key, config
        LOSSES[key] = cls

    def __init__(self, config: Any, ctx: LossContext) -> None:
        self.config = config

    @classmethod
    def enabled(cls, config: Any) -> bool:
        """Whether ``config`` switches the loss on; by default, a weight above zero."""
        return config.weight > 0

    @classmethod
    def build(cls, config: Any, ctx: LossContext) -> StudentLoss | None:
        """The loss for this run, or None where the config leaves it off."""
        return cls(config, ctx) if cls.enabled(config) else None

    def terms(self, s: StudentStep) -> Terms:
        """This step's terms, added to the student's loss as weight * value."""
        raise NotImplementedError

    def own_model(self) -> OwnModel | None:
        """The model this loss trains itself, if any (asked once, before training)."""
        return None

    def after_step(self, s: StudentStep, optimize: Optimize) -> dict[str, float]:
        """The own model's step, after the student's: ``optimize(name, loss)``; returns values to log."""
        return {}


class LossesConfig(dict[str, Any]):
    """The ``losses:`` section: each registered loss's config under its key, the defaults where the
    YAML leaves a loss out; ``cfg.losses.vsd`` reads like the dataclass section it replaces."""

    def __init__(self, configs: Mapping[str, Any] | None = None) -> None:
        super().__init__((key, cls.config_class()) for key, cls in LOSSES.items())
        self.update(configs or {})

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"no loss is registered as {key!r}") from None

    @classmethod
    def from_config_section(cls, data: Any, where: str) -> LossesConfig:
        return cls(sections_from_dict({key: c.config_class for key, c in LOSSES.items()}, data, where))


def build_losses(ctx: LossContext) -> list[StudentLoss]:
    """The run's enabled losses, in registration order."""
    built = (cls.build(ctx.cfg.losses[key], ctx) for key, cls in LOSSES.items())
    return [loss for loss in built if loss is not None]
