"""Bug replays that patch the guest layer (``guest/``): BUG-5.

Each function installs one replay on a :class:`~apicsim.replays.patcher.Patcher`, swapping a
seam that ``guest/*.py`` declares in ``REPLAY_SEAMS`` for a re-creation of the Linux guest's
code before the fix (reference ``kvm_lapic.md`` §17).  Not here: the catalogue
(``apicsim.replays``) and the replays of the lower layers (``lapic.py``, ``hypervisor.py``).
"""

from __future__ import annotations

from guest.cpu import GuestCpu
from guest.kvm_pv import KvmPv

from .patcher import Patcher


def bug5(p: Patcher) -> None:
    """The guest's ``__send_ipi_mask`` before the WARN_ONCE: the result is thrown away."""

    def _warn_once(self: KvmPv, cpu: GuestCpu, ret: int) -> None:
        return None  # no WARN_ONCE(ret < 0, ...): the hypercall's result was never looked at

    p.set(KvmPv, "_warn_once", _warn_once)


__all__ = ["bug5"]
