"""Checks of values users hand in (option ranges) and of numbers models hand out (finite), as one-line errors.

Options are checked up front, before a model is loaded or a step is sampled, so a bad value costs nothing and
never turns into a silent default or garbage output. Messages name the option and its value:
``--steps 0: must be a whole number of at least 1``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from histosynth.errors import HistosynthError


def whole_number(option: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum]; bools and fractions are refused, not rounded."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise HistosynthError(f"{option} {value!r}: must be a whole number")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"of at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise HistosynthError(f"{option} {value}: must be a whole number {bound}")
    return value


def finite_number(option: str, value: Any, minimum: float | None = None, maximum: float | None = None,
                  above: float | None = None) -> float:
    """``value`` as a finite float, optionally ≥ ``minimum``, ≤ ``maximum`` and > ``above``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HistosynthError(f"{option} {value!r}: must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise HistosynthError(f"{option} {value}: must be a finite number")
    if above is not None and not value > above:
        raise HistosynthError(f"{option} {value:g}: must be greater than {above:g}")
    if minimum is not None and value < minimum:
        raise HistosynthError(f"{option} {value:g}: must be at least {minimum:g}")
    if maximum is not None and value > maximum:
        raise HistosynthError(f"{option} {value:g}: must be at most {maximum:g}")
    return value


def fraction(option: str, value: Any) -> float:
    """A finite number in [0, 1]."""
    return finite_number(option, value, minimum=0.0, maximum=1.0)


def one_of(option: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise HistosynthError(f"{option} {value!r}: not one of {', '.join(choices)}")
    return value


def all_finite(values, limit: int = 2**22) -> bool:
    """Whether every number of a torch tensor is finite, looked at in parts of at most ``limit`` elements:
    ``torch.isfinite`` of a floating tensor takes its absolute value whole first, so checking a 32768² px slide's
    latent canvas in one call would hold a canvas more for a moment (2 GiB; README, "Large slides")."""
    import torch

    if values.ndim == 0 or values.numel() <= limit:
        return bool(torch.isfinite(values).all())
    per_index = values[0].numel()
    if per_index > limit:
        return all(all_finite(part, limit) for part in values)
    return all(bool(torch.isfinite(part).all()) for part in values.split(max(1, limit // per_index)))


def require_finite(values: Any, source: str, what: str) -> Any:
    """``values`` (a torch tensor or numpy array) unchanged if every number in it is finite; a one-line error
    otherwise, raised before anything is written from them (NaN pixels would be saved as black or garbage)."""
    if hasattr(values, "isfinite"):  # torch
        finite = all_finite(values)
    else:
        import numpy as np

        finite = bool(np.isfinite(values).all())
    if not finite:
        raise HistosynthError(f"{source}: {what} are not finite (NaN or infinity); nothing was written "
                              "(a broken model, or a guidance scale so large that the numbers overflow)")
    return values
