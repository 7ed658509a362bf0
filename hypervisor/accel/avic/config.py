"""``Avic``: the AVIC accelerator's settings, ``Vm(accelerator=Avic(...))`` (frozen data).

Sources: KVM's ``kvm_amd`` module parameters and CPU features (``avic``, ``enable_ipiv``,
X86_FEATURE_X2AVIC, X86_FEATURE_X2AVIC_EXT), erratum #1235 (d921665e01ba, 8de4a1c8164e) and
the model's documented address mappings; rules in ``specs/avic.md`` (AV-E5, AV-F2, AV-B7,
AVIC-CHOICE-6).  ``hypervisor.accel.avic`` re-exports it with the state it configures.

Not modelled here: anything a VM does with the settings (``hypervisor.accel.avic``).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypervisor.config import AccelConfig
from hypervisor.hw.avic import IpiFailure
from lapic.faults import ApicTypeError, ApicValueError, check_bool, check_int


@dataclass(frozen=True, slots=True)
class Avic(AccelConfig):
    """AVIC's settings (frozen, shareable between VMs)."""

    name: str = "avic"
    x2avic: bool = True
    """The CPU has x2AVIC (X86_FEATURE_X2AVIC): x2APIC guests are accelerated too."""
    x2avic_4k: bool = False
    """x2AVIC with 4096 physical table entries (X86_FEATURE_X2AVIC_EXT)."""
    enable_ipiv: bool = True
    """KVM's ``enable_ipiv``: IsRunning is ever set in the hardware table (AV-E5)."""
    cpu_family: int = 0x19
    """0x17 has erratum #1235 (stale IsRunning reads), which forces ``enable_ipiv`` off."""
    force_ipiv: bool = False
    """Model knob: keep ``enable_ipiv`` on despite the erratum (KVM before 8de4a1c8164e)."""
    backing_page_base: int = 0x1_0000_0000
    """vCPU index ``i``'s backing page is at ``backing_page_base + i * 0x1000``."""
    physical_table_pa: int = 0x2345_6000
    logical_table_pa: int = 0x2346_0000
    vm_id: int = 1
    """The VM id of the GA tag (one-based, 5ea11f2b31b8)."""
    icr_busy_causes: frozenset[IpiFailure] = frozenset()
    """UNVERIFIED (APM; KVM's comment: "hardware may sometimes leave the BUSY flag set"): the
    ``AVIC_INCOMPLETE_IPI`` causes for which the CPU leaves ICR.BUSY (bit 12) set in the
    backing page when it traps (AV-B7).  Empty: the CPU always clears it, as before."""
    invalid_vector_exit: bool = False
    """UNVERIFIED (APM): the CPU refuses vectors 0-15 with INVALID_IPI_VECTOR (cause 4, which
    KVM ignores).  False: they are sent like any other vector, as KVM's emulation does."""

    def __post_init__(self) -> None:
        AccelConfig.__post_init__(self)
        for name in ("x2avic", "x2avic_4k", "enable_ipiv", "force_ipiv", "invalid_vector_exit"):
            check_bool(name, getattr(self, name))
        for name, top in (
            ("cpu_family", 0xFF), ("backing_page_base", (1 << 52) - 1),
            ("physical_table_pa", (1 << 52) - 1), ("logical_table_pa", (1 << 52) - 1),
            ("vm_id", (1 << 20) - 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ApicTypeError(f"{name} must be an int, not {type(value).__name__}")
            check_int(name, value, 0, top)
        if not isinstance(self.icr_busy_causes, frozenset) or not all(
            isinstance(c, IpiFailure) for c in self.icr_busy_causes
        ):
            raise ApicTypeError("icr_busy_causes must be a frozenset of IpiFailure")
        for name in ("backing_page_base", "physical_table_pa", "logical_table_pa"):
            if getattr(self, name) & 0xFFF:
                raise ApicValueError(f"{name}={getattr(self, name):#x} is not page-aligned")
        if self.name != "avic":
            raise ApicValueError(f"name={self.name!r}: an Avic config is named 'avic'")
        if self.x2avic_4k and not self.x2avic:
            raise ApicValueError("x2avic_4k=True needs x2avic=True")
        if self.erratum_1235 and not self.force_ipiv:
            object.__setattr__(self, "enable_ipiv", False)

    @property
    def erratum_1235(self) -> bool:
        """AMD family 0x17: the CPU may read a stale IsRunning (8de4a1c8164e)."""
        return self.cpu_family == 0x17

    @property
    def icr_split(self) -> bool:
        """AV-F2: the x2AVIC backing page holds the x2APIC ICR split at 0x300/0x310."""
        return True


# What a bug replay (``apicsim/replays/accel.py``) may swap.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "Avic.icr_split",  # BR-A17 73b42dc69be8: x2AVIC's split ICR
    }
)
