"""Linux's local-APIC drivers, as the guest executes them: boot-time setup and IPI sends.

Implements (Linux ``arch/x86/kernel/apic/``, read as of the 5.x-6.8 trees; function names are
Linux's):

================  ==========================================================================
``flat``          ``apic_flat_64.c`` ``apic_flat``: logical flat mode, LDR = 1 << cpu
                  (``flat_init_apic_ldr``/``default_init_apic_ldr``: DFR write, LDR read, LDR
                  write); ``flat_send_IPI_mask`` = ONE logical IPI whose destination is the
                  cpumask's first word (``_flat_send_IPI_mask`` -> ``__default_send_IPI_dest_
                  field``, no empty-mask check, so an empty mask still writes ICR2/ICR with
                  destination 0); ``flat_send_IPI_mask_allbutself`` clears the sender's bit.
                  At most 8 CPUs (the LDR has 8 logical bits): more raise ``ApicValueError``.
``physflat``      ``apic_physflat``: one physical IPI per CPU in the mask
                  (``default_send_IPI_mask_sequence_phys``, ``..._allbutself_phys`` skips the
                  sender).
``x2apic_phys``   ``x2apic_phys.c``: one WRMSR 0x830 per destination CPU, value
                  ``apicid << 32 | icr_low`` (``__x2apic_send_IPI_mask``/``__x2apic_send_IPI_
                  dest``); allbutself skips the sender.
``x2apic_cluster``  ``x2apic_cluster.c`` ``__x2apic_send_IPI_mask``: copy the mask (clear the
                  sender for allbutself); for each CPU left, OR the logical IDs (read from the
                  LDR at boot) of every mask CPU in its cluster (LDR >> 16), send ONE logical
                  WRMSR 0x830, drop that cluster: one exit per cluster touched.
================  ==========================================================================

Common to all: ``__prepare_ICR`` (``APIC_DM_FIXED | vector``, or ``APIC_DM_NMI`` with vector
field 0 for ``NMI_VECTOR`` = 2; the assert bit is never set; it means nothing to KVM for fixed
and NMI; the x2APIC drivers read it from ``ICR_LOW_PHYSICAL``/``ICR_LOW_LOGICAL``, computed
once per vector); the xAPIC wait for ICR idle before every send (``apic_mem_wait_icr_idle`` /
``..._timeout`` for NMI: one MMIO read of ICR when bit 12 is clear, which under KVM it always
is); the shorthand sends ``send_IPI_allbutself``/``send_IPI_all``/``send_IPI_self`` as one ICR
write with the shorthand and no ICR2 write (xAPIC ``__default_send_IPI_shortcut``, x2APIC
``__x2apic_send_IPI_shorthand``).  ``send_IPI`` (one CPU) is ``default_send_IPI_single`` for
flat (which goes through the *installed* ``send_IPI_mask``, so through kvm_pv when PV IPIs are
on), ``default_send_IPI_single_phys`` for physflat, ``x2apic_send_IPI`` for x2APIC.

Boot steps per CPU (in ``setup_local_APIC`` order as simplified for this project): x2APIC
drivers first enable x2APIC mode (``__x2apic_enable``: RDMSR IA32_APIC_BASE, and WRMSR it with
EXTD|EN only if EXTD was clear); xAPIC drivers then program DFR/LDR (``init_apic_ldr``); the
caller (``guest.cpu``) then writes SVR and TPR and reads back the APIC ID and LDR.

Two Linux details kept on purpose: ``send_IPI_self`` on the x2APIC drivers writes the SELF
IPI MSR 0x83F (``x2apic_send_IPI_self``: ``apic_write(APIC_SELF_IPI, vector)``), not the ICR;
physflat has no ``init_apic_ldr``, so DFR/LDR keep their RESET values.

Not modelled: TPR via CR8, ``apic_use_ipi_shorthand`` (whether Linux prefers shorthands or
``send_IPI_mask_allbutself(cpu_online_mask)``: the caller picks the function), CPU hotplug and
offline CPUs (every CPU is online), the weak WRMSR fence, the xAPIC ``bigsmp``/cluster drivers
of i386, x2APIC ``x2apic_max_apicid`` checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lapic.faults import ApicValueError

if TYPE_CHECKING:
    from guest.cpu import GuestCpu

# --- arch/x86/include/asm/apicdef.h ----------------------------------------------------------
APIC_ID = 0x20
APIC_TASKPRI = 0x80
APIC_EOI = 0xB0
APIC_LDR = 0xD0
APIC_DFR = 0xE0
APIC_SPIV = 0xF0
APIC_ICR = 0x300
APIC_ICR2 = 0x310
APIC_SELF_IPI = 0x3F0

APIC_DFR_FLAT = 0xFFFFFFFF
APIC_LDR_MASK = 0xFF << 24
APIC_SPIV_APIC_ENABLED = 0x100
SPURIOUS_APIC_VECTOR = 0xFF

APIC_ICR_BUSY = 0x1000
APIC_DEST_PHYSICAL = 0x000
APIC_DEST_LOGICAL = 0x800
APIC_DM_FIXED = 0x000
APIC_DM_NMI = 0x400
APIC_DEST_SELF = 0x40000
APIC_DEST_ALLINC = 0x80000
APIC_DEST_ALLBUT = 0xC0000

NMI_VECTOR = 2

MSR_IA32_APICBASE = 0x1B
APIC_BASE_ENABLE = 0x800
X2APIC_ENABLE = 0x400
X2APIC_MSR_BASE = 0x800

ICR_IDLE_RETRIES = 1000
"""``apic_mem_wait_icr_idle_timeout``: 1000 reads (with udelay(100) between) before giving up."""


def prepare_icr(shortcut: int, vector: int, dest_mode: int) -> int:
    """Linux ``__prepare_ICR``: the ICR low dword (NMI_VECTOR becomes APIC_DM_NMI)."""
    icr = shortcut | dest_mode
    if vector == NMI_VECTOR:
        return icr | APIC_DM_NMI
    return icr | APIC_DM_FIXED | vector


ICR_LOW_PHYSICAL: tuple[int, ...] = tuple(
    prepare_icr(0, v, APIC_DEST_PHYSICAL) for v in range(256)
)
ICR_LOW_LOGICAL: tuple[int, ...] = tuple(prepare_icr(0, v, APIC_DEST_LOGICAL) for v in range(256))
"""``prepare_icr(0, vector, dest_mode)`` by vector, computed once: the ICR low dword of a
destination-field IPI (no shorthand), physical or logical."""

MSR_X2APIC_ICR = X2APIC_MSR_BASE + (APIC_ICR >> 4)
"""0x830, the x2APIC ICR (one 64-bit register: destination in bits 63:32)."""


class Driver:
    """One ``struct apic`` as the guest uses it.  Methods take the executing CPU first."""

    name: str
    """The name accepted by ``Guest(vm, driver=...)``."""
    linux_name: str
    """``struct apic .name`` in Linux."""
    x2apic: bool
    """Registers are MSRs (x2APIC mode) rather than MMIO."""
    dest_mode_logical: bool
    max_cpus: int | None = None

    # -- boot ---------------------------------------------------------------------------
    def enable(self, cpu: GuestCpu) -> None:
        """Put the APIC in the mode this driver needs (x2APIC: ``__x2apic_enable``)."""

    def init_apic_ldr(self, cpu: GuestCpu) -> None:
        """``apic->init_apic_ldr``: program DFR/LDR (nothing for x2APIC: the LDR is fixed)."""

    # -- sends --------------------------------------------------------------------------
    def send_IPI(self, cpu: GuestCpu, target: int, vector: int) -> None:
        raise NotImplementedError

    def send_IPI_mask(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        raise NotImplementedError

    def send_IPI_mask_allbutself(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        raise NotImplementedError

    def send_IPI_allbutself(self, cpu: GuestCpu, vector: int) -> None:
        self.send_shorthand(cpu, APIC_DEST_ALLBUT, vector)

    def send_IPI_all(self, cpu: GuestCpu, vector: int) -> None:
        self.send_shorthand(cpu, APIC_DEST_ALLINC, vector)

    def send_IPI_self(self, cpu: GuestCpu, vector: int) -> None:
        self.send_shorthand(cpu, APIC_DEST_SELF, vector)

    def send_shorthand(self, cpu: GuestCpu, shortcut: int, vector: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# =============================================================================================
# xAPIC (MMIO) drivers
# =============================================================================================
class XapicDriver(Driver):
    x2apic = False

    def wait_icr_idle(self, cpu: GuestCpu, vector: int) -> None:
        """``apic_mem_wait_icr_idle`` (``..._timeout`` for NMI): read ICR until bit 12 is clear.

        Nothing in the model can clear a BUSY bit while the sender spins, so a BUSY that is
        still set after ``ICR_IDLE_RETRIES`` reads stays set forever: an NMI is then sent
        anyway (as Linux's timeout variant does); any other vector raises ``ApicValueError``
        (Linux would spin forever).
        """
        for _ in range(ICR_IDLE_RETRIES):
            if not cpu.read_apic(APIC_ICR) & APIC_ICR_BUSY:
                return
        if vector != NMI_VECTOR:
            raise ApicValueError(
                f"CPU {cpu.index}: ICR delivery status stays busy; Linux would spin forever"
            )

    def send_dest_field(self, cpu: GuestCpu, dest: int, vector: int, dest_mode: int) -> None:
        """Linux ``__default_send_IPI_dest_field``: wait idle, ICR2 = dest << 24, ICR."""
        self.wait_icr_idle(cpu, vector)
        cpu.write_apic(APIC_ICR2, (dest & 0xFF) << 24)
        cpu.write_apic(APIC_ICR, prepare_icr(0, vector, dest_mode))

    def send_shorthand(self, cpu: GuestCpu, shortcut: int, vector: int) -> None:
        """Linux ``__default_send_IPI_shortcut``: wait idle, then ICR only (no ICR2 write)."""
        self.wait_icr_idle(cpu, vector)
        cpu.write_apic(APIC_ICR, prepare_icr(shortcut, vector, 0))


class Flat(XapicDriver):
    name = "flat"
    linux_name = "flat"
    dest_mode_logical = True
    max_cpus = 8

    def init_apic_ldr(self, cpu: GuestCpu) -> None:
        """``default_init_apic_ldr``: DFR flat, LDR logical ID = 1 << cpu (read-modify-write)."""
        cpu.write_apic(APIC_DFR, APIC_DFR_FLAT)
        value = cpu.read_apic(APIC_LDR) & ~APIC_LDR_MASK & 0xFFFFFFFF
        cpu.write_apic(APIC_LDR, value | ((1 << cpu.index) << 24))

    def send_IPI(self, cpu: GuestCpu, target: int, vector: int) -> None:
        """``default_send_IPI_single``: ``apic->send_IPI_mask(cpumask_of(cpu))`` (installed)."""
        cpu.guest.driver.send_IPI_mask(cpu, (target,), vector)

    def send_IPI_mask(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        """``flat_send_IPI_mask``: the cpumask's first word is the logical destination."""
        mask = 0
        for c in cpus:
            mask |= 1 << c
        self.send_dest_field(cpu, mask, vector, APIC_DEST_LOGICAL)

    def send_IPI_mask_allbutself(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        """``flat_send_IPI_mask_allbutself``: the same with the sender's bit cleared."""
        self.send_IPI_mask(cpu, [c for c in cpus if c != cpu.index], vector)


class PhysFlat(XapicDriver):
    name = "physflat"
    linux_name = "physical flat"
    dest_mode_logical = False

    def init_apic_ldr(self, cpu: GuestCpu) -> None:
        """Linux's physflat has no ``init_apic_ldr``: DFR/LDR keep their RESET values."""
        return None

    def send_IPI(self, cpu: GuestCpu, target: int, vector: int) -> None:
        """``default_send_IPI_single_phys``."""
        self.send_dest_field(cpu, cpu.guest.cpu_to_apicid[target], vector, APIC_DEST_PHYSICAL)

    def send_IPI_mask(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        """``default_send_IPI_mask_sequence_phys``: one physical IPI per CPU, in CPU order."""
        apicids = cpu.guest.cpu_to_apicid
        for c in cpus:
            self.send_dest_field(cpu, apicids[c], vector, APIC_DEST_PHYSICAL)

    def send_IPI_mask_allbutself(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        """``default_send_IPI_mask_allbutself_phys``: the same, skipping the sender."""
        self.send_IPI_mask(cpu, [c for c in cpus if c != cpu.index], vector)


# =============================================================================================
# x2APIC (MSR) drivers
# =============================================================================================
class X2apicDriver(Driver):
    x2apic = True

    def enable(self, cpu: GuestCpu) -> None:
        """``__x2apic_enable``: RDMSR IA32_APIC_BASE; WRMSR with EXTD (and EN) unless set."""
        value = cpu.vcpu.rdmsr(MSR_IA32_APICBASE)
        if value & X2APIC_ENABLE:
            return
        cpu.vcpu.wrmsr(MSR_IA32_APICBASE, value | X2APIC_ENABLE | APIC_BASE_ENABLE)

    @staticmethod
    def icr_write(cpu: GuestCpu, low: int, dest: int) -> None:
        """``native_x2apic_icr_write``: WRMSR 0x830, ``dest << 32 | low``."""
        cpu.vcpu.wrmsr(MSR_X2APIC_ICR, (dest << 32) | low)

    def send_shorthand(self, cpu: GuestCpu, shortcut: int, vector: int) -> None:
        """``__x2apic_send_IPI_shorthand``: one ICR write, destination 0."""
        self.icr_write(cpu, prepare_icr(shortcut, vector, 0), 0)

    def send_IPI_self(self, cpu: GuestCpu, vector: int) -> None:
        """``x2apic_send_IPI_self``: WRMSR to the SELF IPI register (MSR 0x83F)."""
        cpu.vcpu.wrmsr(X2APIC_MSR_BASE + (APIC_SELF_IPI >> 4), vector)


class X2apicPhys(X2apicDriver):
    name = "x2apic_phys"
    linux_name = "physical x2apic"
    dest_mode_logical = False

    def send_IPI(self, cpu: GuestCpu, target: int, vector: int) -> None:
        """``x2apic_send_IPI``: ``__x2apic_send_IPI_dest(apicid, vector, PHYSICAL)``."""
        cpu.vcpu.wrmsr(MSR_X2APIC_ICR, cpu.cpu_to_apicid[target] << 32 | ICR_LOW_PHYSICAL[vector])

    def send_IPI_mask(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        """``__x2apic_send_IPI_mask``: one ICR write (``native_x2apic_icr_write``) per CPU."""
        low = ICR_LOW_PHYSICAL[vector]
        apicids = cpu.cpu_to_apicid
        wrmsr = cpu.vcpu.wrmsr
        for c in cpus:
            wrmsr(MSR_X2APIC_ICR, apicids[c] << 32 | low)

    def send_IPI_mask_allbutself(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        """``__x2apic_send_IPI_mask`` with ALLBUT: the same, skipping the sender."""
        low = ICR_LOW_PHYSICAL[vector]
        apicids = cpu.cpu_to_apicid
        wrmsr = cpu.vcpu.wrmsr
        me = cpu.index
        for c in cpus:
            if c != me:
                wrmsr(MSR_X2APIC_ICR, apicids[c] << 32 | low)


class X2apicCluster(X2apicDriver):
    name = "x2apic_cluster"
    linux_name = "cluster x2apic"
    dest_mode_logical = True

    def send_IPI(self, cpu: GuestCpu, target: int, vector: int) -> None:
        """``x2apic_send_IPI``: one logical IPI to the target's logical ID."""
        self.icr_write(cpu, ICR_LOW_LOGICAL[vector], cpu.guest.cpu_to_logical_apicid[target])

    def _send_mask(self, cpu: GuestCpu, cpus: Sequence[int], vector: int, allbut: bool) -> None:
        """``__x2apic_send_IPI_mask``: collapse the CPUs of one cluster into one IPI."""
        logical = cpu.guest.cpu_to_logical_apicid
        tmpmsk = [c for c in cpus if not (allbut and c == cpu.index)]
        low = ICR_LOW_LOGICAL[vector]
        while tmpmsk:
            cluster = logical[tmpmsk[0]] >> 16
            dest = 0
            for c in tmpmsk:
                if logical[c] >> 16 == cluster:
                    dest |= logical[c]
            tmpmsk = [c for c in tmpmsk if logical[c] >> 16 != cluster]
            if dest:
                self.icr_write(cpu, low, dest)

    def send_IPI_mask(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        self._send_mask(cpu, cpus, vector, allbut=False)

    def send_IPI_mask_allbutself(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        self._send_mask(cpu, cpus, vector, allbut=True)


BASE_DRIVERS: dict[str, type[Driver]] = {
    "flat": Flat,
    "physflat": PhysFlat,
    "x2apic_phys": X2apicPhys,
    "x2apic_cluster": X2apicCluster,
}
"""The drivers ``kvm_pv`` can sit on, by name."""
