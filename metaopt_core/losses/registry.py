"""Build any loss of the package by name: ``get_loss("gce", q=0.5)``, ``get_loss("taylor:itl")``.

Names (lowercase; lookup ignores case and surrounding spaces):

- hand-designed: ``ce``, ``label_smoothing``, ``gce``, ``sce``, ``mae``, ``nce+mae``, ``nfl+mae``,
  ``bootstrap_soft``, ``bootstrap_hard``, ``focal``, ``bitempered``, ``baikal``, ``huber``,
  ``forward`` (needs ``transition_matrix=``);
- ``taylor:<preset>``: ``TaylorLoss.from_preset(preset, **kwargs)`` for the published parameters;
- ``taylor``: ``TaylorLoss(params=..., **kwargs)``. ``params`` is required: a zero-initialised
  Taylor loss is identically 0 (no gradient), which is a starting point for meta-learning, not a
  loss to train with; build ``TaylorLoss()`` directly for that.

Keyword arguments go to the loss's constructor; an unknown one is a ``TypeError`` naming the
loss and the parameters it accepts. Unknown names are an ``UnknownLossError`` (a ``KeyError``
and a ``ValueError``) listing the known ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from metaopt_core.losses import robust, robust_corrected
from metaopt_core.losses.taylor import PRESETS, TaylorLoss

# name -> constructor; every constructor takes only keyword-compatible arguments
_HAND_DESIGNED: dict[str, type[nn.Module]] = {
    "ce": robust.CrossEntropy,
    "label_smoothing": robust.LabelSmoothingCrossEntropy,
    "gce": robust.GeneralizedCrossEntropy,
    "sce": robust.SymmetricCrossEntropy,
    "mae": robust.MeanAbsoluteError,
    "nce+mae": robust.NCEandMAE,
    "nfl+mae": robust.NFLandMAE,
    "bootstrap_soft": robust_corrected.SoftBootstrap,
    "bootstrap_hard": robust_corrected.HardBootstrap,
    "focal": robust_corrected.FocalLoss,
    "bitempered": robust_corrected.BiTemperedLogisticLoss,
    "baikal": robust_corrected.BaikalLoss,
    "huber": robust_corrected.HuberProbabilityLoss,
    "forward": robust_corrected.ForwardCorrectedCrossEntropy,
}

TAYLOR_PREFIX = "taylor:"


class UnknownLossError(KeyError, ValueError):
    """An unknown loss name or Taylor preset (catchable as KeyError or ValueError)."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


# from_preset fixes the parameter vector, its order and its form
_PRESET_FIXED = ("params", "order", "form")


def list_losses() -> list[str]:
    """All names ``get_loss`` accepts: the hand-designed losses, ``taylor`` and ``taylor:<preset>``."""
    return sorted(_HAND_DESIGNED) + ["taylor"] + [TAYLOR_PREFIX + name for name in sorted(PRESETS)]


def hand_designed_losses() -> dict[str, type[nn.Module]]:
    """The hand-designed losses by name (a copy): ``{"ce": CrossEntropy, "gce": ...}``."""
    return dict(_HAND_DESIGNED)


def loss_parameters(name: str) -> dict[str, object]:
    """Constructor parameters of the loss ``name`` and their defaults (``inspect.Parameter.empty``
    for required ones), e.g. for logging or a config schema."""
    _, params = _resolve(name)
    return dict(params)


def get_loss(name: str, **kwargs) -> nn.Module:
    """The loss called ``name`` (see ``list_losses()``), built with ``kwargs``.

    Raises ``UnknownLossError`` (a ``KeyError``) for an unknown name or preset, listing the known ones, and
    ``TypeError`` for an unknown or missing keyword argument, naming the accepted parameters.
    """
    factory, params = _resolve(name)
    key = _normalise(name)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        hint = f" ({', '.join(_PRESET_FIXED)} are set by the preset)" if key.startswith(TAYLOR_PREFIX) else ""
        raise TypeError(f"get_loss({key!r}): unknown parameter(s) {unknown}; accepted: {sorted(params)}{hint}")
    missing = sorted(p for p, default in params.items() if default is inspect.Parameter.empty and p not in kwargs)
    if missing:
        why = " (a zero-initialised Taylor loss is constant; use 'taylor:<preset>' for published parameters)" if key == "taylor" else ""
        raise TypeError(f"get_loss({key!r}): missing required parameter(s) {missing}{why}")
    return factory(**kwargs)


def _normalise(name: str) -> str:
    if not isinstance(name, str):
        raise UnknownLossError(f"loss name: got {name!r}; known: {list_losses()}")
    return name.strip().lower()


def _constructor_params(func: Callable, skip: tuple[str, ...] = ()) -> dict[str, object]:
    signature = inspect.signature(func)
    return {
        p.name: p.default for p in signature.parameters.values() if p.name not in ("self", "cls", *skip) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _resolve(name: str) -> tuple[Callable[..., nn.Module], dict[str, object]]:
    """Constructor of ``name`` and its accepted keyword parameters (name -> default)."""
    key = _normalise(name)
    if key in _HAND_DESIGNED:
        cls = _HAND_DESIGNED[key]
        return cls, _constructor_params(cls.__init__)
    if key == "taylor":
        params = _constructor_params(TaylorLoss.__init__)
        params["params"] = inspect.Parameter.empty  # required here, see the module docstring
        return TaylorLoss, params
    if key.startswith(TAYLOR_PREFIX):
        preset = key[len(TAYLOR_PREFIX) :]
        if preset not in PRESETS:
            raise UnknownLossError(f"taylor preset: got {preset!r}; known presets: {sorted(PRESETS)} (use 'taylor:<preset>')")

        def build(**kwargs) -> nn.Module:
            return TaylorLoss.from_preset(preset, **kwargs)

        return build, _constructor_params(TaylorLoss.__init__, skip=_PRESET_FIXED)
    raise UnknownLossError(f"loss name: got {name!r}; known: {list_losses()}")


__all__ = ["TAYLOR_PREFIX", "UnknownLossError", "get_loss", "hand_designed_losses", "list_losses", "loss_parameters"]
