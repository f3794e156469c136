"""Argument validators: one style for every option of the package.

Each check raises at construction, before any state exists, with a
`TypeError` (wrong kind of value) or a `ValueError` (right kind, bad value)
whose message names the argument, shows the value and says what is allowed.
K-FAC keeps its hyperparameters in float32, so a number that overflows to
Inf, or a positive number that underflows to 0, is rejected too.
"""

import math
import numbers
import re

import keras
import numpy as np

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_INT32_MAX = 2**31 - 1
_SCOPE_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.>-]*$")


def is_schedule(value):
    """True for a `keras.optimizers.schedules.LearningRateSchedule`."""
    return isinstance(value, keras.optimizers.schedules.LearningRateSchedule)


def is_number(value):
    """True for a real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _interval(low, high, low_open, high_open):
    lower = ("(" if low_open or low is None else "[") + ("-inf" if low is None else repr(low))
    upper = ("inf" if high is None else repr(high)) + (
        ")" if high_open or high is None else "]")
    return f"{lower}, {upper}"


def check_number(name, value, low=None, high=None, low_open=False, high_open=False,
                 integer=False, allow_none=False, allow_schedule=False):
    """Checks a numeric argument and returns it unchanged.

    Args:
        name: the argument's name, for the message.
        value: the value given.
        low: optional lower bound. Defaults to None (unbounded).
        high: optional upper bound. Defaults to None (unbounded).
        low_open: bool, whether `low` itself is excluded. Defaults to False.
        high_open: bool, whether `high` itself is excluded. Defaults to False.
        integer: bool, whether the value must be an integer (int32 range).
            Defaults to False (a float32-representable real number).
        allow_none: bool, whether None is accepted. Defaults to False.
        allow_schedule: bool, whether a `LearningRateSchedule` or another
            callable is accepted (and returned unchecked). Defaults to False.

    Returns:
        `value`.

    Raises:
        TypeError: the value is not a number (of the right kind).
        ValueError: it is not finite, outside the bounds or outside float32
            (int32 for integers).
    """
    if allow_none and value is None:
        return value
    if allow_schedule and (is_schedule(value) or callable(value)):
        return value
    if not is_number(value) or (integer and not isinstance(value, numbers.Integral)):
        kind = "an integer" if integer else "a number"
        extra = (" or a keras.optimizers.schedules.LearningRateSchedule" if allow_schedule
                 else "") + (" or None" if allow_none else "")
        raise TypeError(f"`{name}` must be {kind}{extra}; received {value!r} of type "
                        f"{type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite; received {value!r}.")
    if integer and abs(value) > _INT32_MAX:
        raise ValueError(f"`{name}` must be at most {_INT32_MAX} in magnitude; "
                         f"received {value!r}.")
    if not integer:
        magnitude = abs(float(value))
        if magnitude > _FLOAT32_MAX or 0.0 < magnitude < _FLOAT32_TINY:
            raise ValueError(
                f"`{name}` must be representable in float32 (magnitude 0 or in "
                f"[{_FLOAT32_TINY:g}, {_FLOAT32_MAX:g}]); received {value!r}.")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise ValueError(f"`{name}` must be in {_interval(low, high, low_open, high_open)}; "
                         f"received {value!r}.")
    return value


def check_bool(name, value):
    """Checks that `value` is a bool; returns it."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool; received {value!r} of type "
                        f"{type(value).__name__}.")
    return value


def check_choice(name, value, choices):
    """Checks that `value` is one of `choices` (a tuple); returns it."""
    # A bool matches only a bool (1 == True, but 1 is not a valid `True`).
    if not any(value == choice and isinstance(value, bool) == isinstance(choice, bool)
               for choice in choices):
        raise ValueError(f"`{name}` must be one of {choices}; received {value!r}.")
    return value


def check_scope_name(name, value):
    """Checks a name that TensorFlow will use as a name scope; returns it.

    TensorFlow rejects other names only when it builds the first graph (deep
    inside the first training step), so they are rejected here.
    """
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a string; received {value!r} of type "
                        f"{type(value).__name__}.")
    if not _SCOPE_NAME.match(value):
        raise ValueError(
            f"`{name}` must be a TensorFlow scope name: an ASCII letter, digit or "
            "'.', then letters, digits or any of '_.>-' (no spaces or '/'); "
            f"received {value!r}.")
    return value


def check_string_keyed_dict(name, value, allowed_values, what):
    """Checks a dict from strings to members of `allowed_values`; returns a copy.

    Args:
        name: the argument's name.
        value: the value given (None means an empty dict).
        allowed_values: tuple of the allowed dict values.
        what: what the keys are, for the message (e.g. "layer name or class name").
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"`{name}` must be a dict from {what} to one of {allowed_values}; "
                        f"received {value!r} of type {type(value).__name__}.")
    for key, entry in value.items():
        if not isinstance(key, str):
            raise TypeError(f"`{name}` keys must be strings; received {key!r}.")
        if entry not in allowed_values:
            raise ValueError(f"`{name}[{key!r}]` must be one of {allowed_values}; "
                             f"received {entry!r}.")
    return dict(value)


def check_string_list(name, value, what):
    """Checks a list (or tuple) of strings; None means empty. Returns a list."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"`{name}` must be a list of {what}; received {value!r}.")
    for entry in value:
        if not isinstance(entry, str):
            raise TypeError(f"`{name}` entries must be strings; received {entry!r}.")
    return list(value)
