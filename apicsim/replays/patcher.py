"""The machinery of a bug replay: the :class:`Replay` record and the :class:`Patcher` that swaps
a model object for its buggy variant through a *declared seam* and restores it exactly.

A seam is a name a model module declares in its module-level ``REPLAY_SEAMS`` frozenset
(``"LocalApic.eoi"``, ``"_logical_id_aliased"``, ...): the places where KVM's historical fixes
landed, and so the only places a replay may swap.  The patcher checks every swap against the
declaration of the module that *defines* the object:

* a class attribute is looked up along the class's MRO and swapped on the class that defines
  it (a method that moved into a mixin base class is still found; the seam is then
  ``"<Mixin>.<name>"`` in the mixin's module);
* a module-level function is also swapped in every model module that imported it by name
  (``from hypervisor.delivery import deliver``); those follow the declared swap and are not
  seams of their own;
* :meth:`Patcher.set_imported` swaps a constant only where model modules imported it by name,
  leaving the defining module (and the test modules that import it later) alone.

Every swap is recorded (:attr:`Patcher.swaps`) and undone in reverse order by
:meth:`Patcher.restore`, which puts back the very same objects.

Not modelled here: the bugs themselves (``lapic.py``, ``hypervisor.py``, ``guest.py`` of this
package) and the catalogue (``__init__.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from lapic.apic import LocalApic
from lapic.faults import ApicValueError

SEAMS_ATTRIBUTE = "REPLAY_SEAMS"
"""Name of the module-level frozenset in which a model module declares its seams."""

MODEL_PACKAGES = ("lapic", "hypervisor", "guest", "apicsim")
"""Top-level packages whose modules a replay may reach (never tests, never this package)."""

_OWN_PACKAGE = __name__.rpartition(".")[0]

ApplyFn = Callable[[], AbstractContextManager[None]]


class ReplayError(ValueError):
    """An unknown or non-replayable bug id, or a replay whose target left the model (or is not
    a declared seam)."""


@dataclass(frozen=True, slots=True)
class Swap:
    """One swap a patcher made."""

    module: str
    """The model module that declares the seam (defines the object)."""
    seam: str
    """The seam as declared: ``"name"`` or ``"Class.name"``."""
    holder: str
    """Where the swap was made: the module or class, by qualified name."""
    declared: bool
    """True for a swap of the seam itself (for :meth:`Patcher.set_imported`: each importer's
    binding); False for a function's copy also swapped where it was imported by name."""


@dataclass(frozen=True, slots=True)
class Replay:
    """One historical KVM bug and the switch that puts it back into the model."""

    id: str
    """``BUG-n``, the id of reference §17."""
    commit: str
    """Mainline commit (12 hex digits) of the fix, or ``""`` where the reference has "id ?"."""
    title: str
    """The fix's subject line."""
    what: str
    """What the replay puts back (the behaviour before the fix)."""
    rules: tuple[str, ...]
    """Spec rule ids the buggy behaviour violates (``specs/*.md``)."""
    apply: ApplyFn | None
    """Context manager factory that activates the replay, or None (not replayable)."""
    reason: str = ""
    """Why the bug is not replayable (only with ``apply=None``)."""
    install: Callable[[Patcher], None] | None = field(default=None, repr=False, compare=False)
    """What ``apply`` runs: makes the replay's swaps on the given patcher (None: not
    replayable).  A caller that brings its own :class:`Patcher` must call its ``restore``."""

    @property
    def replayable(self) -> bool:
        return self.apply is not None


def declared_seams(module: ModuleType) -> frozenset[str]:
    """The seams ``module`` declares (empty when it declares none)."""
    seams = vars(module).get(SEAMS_ATTRIBUTE, frozenset())
    if not isinstance(seams, frozenset):
        raise ReplayError(f"{module.__name__}.{SEAMS_ATTRIBUTE} must be a frozenset of names")
    return seams


class Patcher:
    """Swaps declared seams of model modules and classes; restores the exact original objects.

    ``check_seams=False`` lets a test swap anything (it still records every swap)."""

    def __init__(self, *, check_seams: bool = True) -> None:
        self.check_seams = check_seams
        self._undo: list[tuple[Any, str, Any]] = []
        self._swaps: list[Swap] = []

    @property
    def swaps(self) -> tuple[Swap, ...]:
        """Every swap made so far, in order."""
        return tuple(self._swaps)

    @staticmethod
    def definer(owner: Any, name: str) -> Any:
        """The module, or the class along ``owner``'s MRO, whose own namespace holds ``name``."""
        chain = owner.__mro__ if isinstance(owner, type) else (owner,)
        for holder in chain:
            if name in vars(holder):
                return holder
        raise ReplayError(f"{_label(owner)}.{name} is not in the model any more")

    @classmethod
    def current(cls, owner: Any, name: str) -> Any:
        """The object ``owner.name`` is now (looked up along the MRO for a class), unbound: a
        function for a method, the property object for a property."""
        return vars(cls.definer(owner, name))[name]

    def set(self, owner: Any, name: str, value: Any) -> None:
        """Replace ``owner.name`` where it is defined (``owner`` or a base class of it).  A
        module-level function is also replaced in every model module that imported it by
        name."""
        holder = self.definer(owner, name)
        old = vars(holder)[name]
        module, seam = self._declared(holder, name)
        self._swap(holder, name, old, value, Swap(module, seam, _label(holder), True))
        if isinstance(holder, ModuleType) and callable(old):
            for other in _model_modules():
                if other is not holder and vars(other).get(name) is old:
                    self._swap(other, name, old, value, Swap(module, seam, other.__name__, False))

    def set_imported(self, module: ModuleType, name: str, value: Any) -> None:
        """Replace the constant ``module.name`` in every model module that imported it by name,
        but not in ``module`` itself: test modules that import it later keep the true value."""
        old = vars(module).get(name, _MISSING)
        if old is _MISSING:
            raise ReplayError(f"{module.__name__}.{name} is not in the model any more")
        seam_module, seam = self._declared(module, name)
        importers = [m for m in _model_modules() if m is not module and vars(m).get(name) is old]
        if not importers:
            raise ReplayError(f"no model module imports {module.__name__}.{name} by name")
        for other in importers:
            self._swap(other, name, old, value, Swap(seam_module, seam, other.__name__, True))

    def _declared(self, holder: Any, name: str) -> tuple[str, str]:
        if isinstance(holder, ModuleType):
            module, seam = holder, name
        else:
            module, seam = sys.modules[holder.__module__], f"{holder.__qualname__}.{name}"
        if self.check_seams and seam not in declared_seams(module):
            raise ReplayError(
                f"{module.__name__}.{seam} is not a declared replay seam "
                f"(add it to {module.__name__}.{SEAMS_ATTRIBUTE})"
            )
        return module.__name__, seam

    def _swap(self, holder: Any, name: str, old: Any, value: Any, swap: Swap) -> None:
        setattr(holder, name, value)
        self._undo.append((holder, name, old))
        self._swaps.append(swap)

    def restore(self) -> None:
        """Put every original object back, last swap first."""
        while self._undo:
            holder, name, old = self._undo.pop()
            setattr(holder, name, old)


_MISSING = object()


def _label(owner: Any) -> str:
    if isinstance(owner, ModuleType):
        return owner.__name__
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    return repr(owner)


def _model_modules() -> list[ModuleType]:
    """Loaded modules of the model packages (never test modules, never this package)."""
    return [
        module
        for name, module in list(sys.modules.items())
        if isinstance(module, ModuleType)
        and name.split(".")[0] in MODEL_PACKAGES
        and name != _OWN_PACKAGE
        and not name.startswith(_OWN_PACKAGE + ".")
    ]


def applier(install: Callable[[Patcher], None]) -> ApplyFn:
    """The ``apply`` context-manager factory of a replay: install, yield, restore."""

    @contextmanager
    def apply() -> Iterator[None]:
        patcher = Patcher()
        try:
            install(patcher)
            yield
        finally:
            patcher.restore()

    apply.__doc__ = install.__doc__
    return apply


def oob(slots: Sequence[LocalApic | None], index: int) -> LocalApic | None:
    """``slots[index]`` as C reads it, except that an index outside the array raises (KASAN)
    instead of reading a neighbour (Python's negative indices would wrap around)."""
    if not 0 <= index < len(slots):
        raise IndexError(f"out-of-bounds access: phys_map[{index}] of {len(slots)} slots")
    return slots[index]


U32 = 0xFFFFFFFF


__all__ = [
    "MODEL_PACKAGES",
    "SEAMS_ATTRIBUTE",
    "U32",
    "ApplyFn",
    "Patcher",
    "Replay",
    "ReplayError",
    "Swap",
    "applier",
    "declared_seams",
    "oob",
]


Install = Callable[["Patcher"], None]
"""What a replay row installs: swaps made through the patcher it is given."""
Row = tuple[str, str, str, str, tuple[str, ...], Install | None, str]
"""An accelerator replay row: id, commit, subject, what it puts back, rule ids, the installer
(None if not replayable) and, then, why not."""


@contextmanager
def active_rows(by_id: dict[str, Row], ids: Iterable[str], family: str) -> Iterator[None]:
    """Put the rows ``ids`` of ``by_id`` back for the ``with`` block; ``family`` names the
    catalogue in the error for an unknown id ("an AVIC replay")."""
    patcher = Patcher()
    try:
        for bug in ids:
            row = by_id.get(bug.strip().upper().replace("_", "-"))
            if row is None:
                raise ApicValueError(f"bug={bug!r} is not {family}; known: {list(by_id)}")
            install = row[5]
            if install is None:
                raise ApicValueError(f"{row[0]} is not replayable: {row[6]}")
            install(patcher)
        yield
    finally:
        patcher.restore()
