"""Guest-visible faults and the errors raised for misuse of the Python API.

Two different things go wrong in a model like this one, and they must never be mixed up:

* the *guest* does something the architecture answers with an exception (a WRMSR that sets a
  reserved bit, an illegal IA32_APIC_BASE transition).  That is modelled, not an error of the
  caller: :class:`GuestFault` carries the exception vector (13 for #GP) and the operation that
  raised it leaves the state exactly as it was.
* the *caller* passes something that is not a value of the modelled machine at all (a vector of
  300, an offset outside the APIC page, a state image of the wrong length).  That raises a
  subclass of the built-in ``ValueError``/``TypeError`` whose message names the argument.

The checkers (``check_*``) are the one shared set every layer uses at its public entry points,
before the first side effect: types exactly (no bool for an int, no float for an int, no truthy
object for a bool), then ranges, lengths and choices.  Internal hot paths do not call them.
"""

from __future__ import annotations

from typing import Any

GP_VECTOR = 13
"""#GP, general-protection exception."""

UD_VECTOR = 6
"""#UD, invalid opcode."""


class GuestFault(Exception):
    """An exception the guest would see; the faulting access changed nothing."""

    def __init__(self, vector: int, reason: str) -> None:
        super().__init__(f"guest fault #{_MNEMONIC.get(vector, vector)}: {reason}")
        self.vector = vector
        self.reason = reason

    def __repr__(self) -> str:
        return f"GuestFault(vector={self.vector}, reason={self.reason!r})"


_MNEMONIC = {GP_VECTOR: "GP", UD_VECTOR: "UD"}


def gp(reason: str) -> GuestFault:
    """A #GP(0) with a human-readable reason."""
    return GuestFault(GP_VECTOR, reason)


class ApicValueError(ValueError):
    """An argument has the right type but is outside what the model accepts."""


class ApicTypeError(TypeError):
    """An argument has the wrong type."""


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """Return ``value`` if it is an int in ``[lo, hi]``; else raise naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApicTypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ApicValueError(f"{name}={value:#x} is outside [{lo:#x}, {hi:#x}]")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool (not an int, not a truthy string); else raise naming it."""
    if not isinstance(value, bool):
        raise ApicTypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def check_optional_bool(name: str, value: object) -> bool | None:
    """``value`` if it is a bool or None; else raise naming it."""
    if value is not None and not isinstance(value, bool):
        raise ApicTypeError(f"{name} must be a bool or None, not {type(value).__name__}")
    return value


def check_instance(name: str, value: object, kind: type[Any]) -> None:
    """Raise naming ``name`` unless ``value`` is a ``kind``."""
    if not isinstance(value, kind):
        raise ApicTypeError(f"{name} must be a {kind.__name__}, not {type(value).__name__}")


def check_size(name: str, value: object) -> int:
    """An access width in bytes: exactly the int 1, 2, 4 or 8 (not ``True``, not ``4.0``)."""
    if type(value) is not int:
        raise ApicTypeError(f"{name} must be an int, not {type(value).__name__}")
    if value not in (1, 2, 4, 8):
        raise ApicValueError(f"{name}={value!r} must be 1, 2, 4 or 8")
    return value


def check_callable(name: str, value: object, *, optional: bool = False) -> None:
    """Raise naming ``name`` unless ``value`` is callable (or None when ``optional``)."""
    if value is None and optional:
        return
    if not callable(value):
        what = "callable or None" if optional else "callable"
        raise ApicTypeError(f"{name} must be {what}, not {type(value).__name__}")

