"""``Guest`` and ``GuestCpu``: a Linux-like guest booted on every vCPU of a ``hypervisor.Vm``.

Implements what Linux executes around its APIC driver, as guest accesses on the vCPU that
executes them (so every one is a VM exit under trap-and-emulate):

* boot, per CPU in CPU-number order (``setup_local_APIC`` and friends, simplified): the
  driver's ``enable`` (x2APIC: ``__x2apic_enable``) and ``init_apic_ldr``; SVR =
  ``APIC_SPIV_APIC_ENABLED | SPURIOUS_APIC_VECTOR`` (0x1FF); TPR = 0; then the APIC ID is read
  back into ``cpu_to_apicid`` (``x86_cpu_to_apicid``; xAPIC ``ID >> 24``, x2APIC RDMSR 0x802)
  and the LDR into ``cpu_to_logical_apicid`` (xAPIC ``GET_APIC_LOGICAL_ID(LDR)`` = LDR >> 24,
  x2APIC the whole RDMSR 0x80D as ``init_x2apic_ldr`` stores it);
* PVG-1: ``driver="kvm_pv"`` installs the PV IPI callbacks over the base driver only if
  ``pv_ipi_supported`` (CPUID feature and more than one possible CPU), else the base driver
  stays (``Guest.driver.name`` tells which);
* register access per mode (``apic_read``/``apic_write``: MMIO at the APIC base for xAPIC,
  RDMSR/WRMSR ``0x800 + (offset >> 4)`` for x2APIC), EOI (``apic_eoi``), TPR;
* an interrupt handler on each vCPU (``Vcpu.interrupt_handler``): record the vector in
  ``GuestCpu.handled``, then EOI through the mode's interface; an NMI handler
  (``Vcpu.nmi_handler``) that records vector 2 and takes no EOI;
* the ``apic->send_IPI*`` entry points, with cpumasks given as iterables of CPU numbers
  (visited in ascending order, as ``for_each_cpu`` does).  The common case (plain ints in
  range; a list or tuple mask already ascending, without repeats) passes a fast inline test;
  anything else gets the full checks (``checked_cpumask``, ``check_int``), which raise before
  anything is sent (tests/guest/test_send_fast_path.py: both paths do the same).

The APIC base address is the one the firmware tables report (the vCPU's IA32_APIC_BASE when
the guest boots), read without an exit.

``GuestCpu.send_INIT_SIPI`` sends INIT (assert, then de-assert) and two STARTUP IPIs as
Linux's ``wakeup_secondary_cpu_via_init`` does (ESR cleared before, read after each SIPI).

Not modelled: AP bring-up at boot (every vCPU must already be runnable: ``Vm(...,
aps_started=True)``, the default; ``send_INIT_SIPI`` is the helper for driving it by hand), the
udelay()s between the INIT/SIPI writes, the instruction stream (RFLAGS.IF, interrupt shadows),
CPU hotplug, the LVTs, the timer and ESR setup of ``setup_local_APIC``, the read-modify-write of
SVR and TPR (written whole here), TPR = 0x10 of recent kernels (0 here, as the brief says).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from guest.drivers import (
    APIC_EOI,
    APIC_ID,
    APIC_LDR,
    APIC_SPIV,
    APIC_SPIV_APIC_ENABLED,
    APIC_TASKPRI,
    BASE_DRIVERS,
    NMI_VECTOR,
    SPURIOUS_APIC_VECTOR,
    X2APIC_MSR_BASE,
    Driver,
)
from guest.kvm_pv import KvmPv, pv_ipi_supported
from hypervisor.vcpu import MpState
from hypervisor.vm import Vm
from lapic.faults import ApicTypeError, ApicValueError, check_instance, check_int

if TYPE_CHECKING:
    from hypervisor.vcpu import Vcpu

APIC_ESR = 0x280
APIC_ICR = 0x300
APIC_ICR2 = 0x310
APIC_INT_LEVELTRIG = 0x8000
APIC_INT_ASSERT = 0x4000
APIC_DM_INIT = 0x500
APIC_DM_STARTUP = 0x600
"""ICR/ESR offsets and ICR bits of ``wakeup_secondary_cpu_via_init`` (``asm/apicdef.h``)."""

DRIVERS: tuple[str, ...] = ("flat", "physflat", "x2apic_phys", "x2apic_cluster", "kvm_pv")
"""The names ``Guest(vm, driver=...)`` accepts."""


class GuestCpu:
    """CPU number ``index`` of a :class:`Guest`, running on vCPU ``index`` of the VM."""

    def __init__(self, guest: Guest, index: int) -> None:
        self.guest = guest
        self.index = index
        self.vcpu: Vcpu = guest.vm.vcpu(index)
        self.driver: Driver = guest.driver
        """The guest's driver (``Guest.driver``), bound here for the send paths."""
        self.cpu_to_apicid: list[int] = guest.cpu_to_apicid
        """``Guest.cpu_to_apicid`` (the same list), bound here for the send paths."""
        self.ncpus = len(guest.vm)
        """How many CPUs the guest has (CPU numbers are ``0 .. ncpus - 1``)."""
        self.x2apic = guest.driver.x2apic
        self.apic_base_address = self.vcpu.apic.base_address
        self.handled: list[int] = []
        """Every vector this CPU's handler ran for, in order (2 = NMI)."""
        self.pv_errors: list[int] = []
        """Negative results of PV IPI hypercalls (PVG-4), as signed numbers."""

    # ===================================================================================
    # Register access
    # ===================================================================================
    def read_apic(self, reg_offset: int) -> int:
        """``apic_read``: MMIO read at the APIC base (xAPIC) or RDMSR (x2APIC)."""
        if self.x2apic:
            return self.vcpu.rdmsr(self._msr(reg_offset))
        check_int("reg_offset", reg_offset, 0, 0xFFF)
        return self.vcpu.mmio_read(self.apic_base_address + reg_offset)

    def write_apic(self, reg_offset: int, value: int) -> None:
        """``apic_write``: MMIO write (xAPIC, 32 bits) or WRMSR (x2APIC, 64 bits for ICR)."""
        if self.x2apic:
            self.vcpu.wrmsr(self._msr(reg_offset), check_int("value", value, 0, (1 << 64) - 1))
            return
        check_int("reg_offset", reg_offset, 0, 0xFFF)
        check_int("value", value, 0, 0xFFFFFFFF)
        self.vcpu.mmio_write(self.apic_base_address + reg_offset, value)

    @staticmethod
    def _msr(reg_offset: int) -> int:
        check_int("reg_offset", reg_offset, 0, 0x3FF0)
        if reg_offset & 0xF:
            raise ApicValueError(f"reg_offset={reg_offset:#x} has no x2APIC MSR (not 16-aligned)")
        return X2APIC_MSR_BASE + (reg_offset >> 4)

    def eoi(self) -> None:
        """``apic_eoi``: write 0 to EOI (x2APIC WRMSR 0x80B, xAPIC MMIO 0xB0)."""
        self.write_apic(APIC_EOI, 0)

    def set_tpr(self, value: int) -> None:
        """Write the task-priority register (TPR, offset 0x80 / MSR 0x808)."""
        self.write_apic(APIC_TASKPRI, check_int("value", value, 0, 0xFF))

    def halt(self) -> bool:
        """HLT; True if the vCPU blocked (nothing was pending)."""
        return self.vcpu.halt()

    # ===================================================================================
    # Interrupts
    # ===================================================================================
    def run(self) -> list[int]:
        """One VM entry of this CPU's vCPU with the guest's handlers: what was handled."""
        return self.vcpu.run(self._interrupt, self._nmi)

    def _interrupt(self, vcpu: Vcpu, vector: int) -> None:
        self.handled.append(vector)
        self.eoi()

    def _nmi(self, vcpu: Vcpu) -> None:
        """The NMI handler: recorded as vector 2; an NMI takes no EOI."""
        self.handled.append(NMI_VECTOR)

    # ===================================================================================
    # INIT/SIPI (wakeup_secondary_cpu_via_init)
    # ===================================================================================
    def icr_write(self, low: int, apicid: int) -> None:
        """``native_apic_icr_write`` (ICR2 then ICR) / ``native_x2apic_icr_write``."""
        if self.x2apic:
            self.write_apic(APIC_ICR, apicid << 32 | low)
        else:
            self.write_apic(APIC_ICR2, (apicid & 0xFF) << 24)
            self.write_apic(APIC_ICR, low)

    def send_INIT_SIPI(self, target: int, start_eip: int = 0x9F000) -> int:
        """Linux ``wakeup_secondary_cpu_via_init``: INIT level-assert, INIT de-assert, then
        STARTUP twice with vector ``start_eip >> 12`` to CPU ``target``'s APIC ID; returns
        the ESR bits read after the last STARTUP (``accept_status``, masked with 0xEF)."""
        check_int("target", target, 0, len(self.guest) - 1)
        check_int("start_eip", start_eip, 0, 0xFF000)
        if start_eip & 0xFFF:
            raise ApicValueError(f"start_eip={start_eip:#x} must be 4 KiB aligned")
        apicid = self.guest.cpu_to_apicid[target]
        self.write_apic(APIC_ESR, 0)
        self.read_apic(APIC_ESR)
        self.icr_write(APIC_INT_LEVELTRIG | APIC_INT_ASSERT | APIC_DM_INIT, apicid)
        self.icr_write(APIC_INT_LEVELTRIG | APIC_DM_INIT, apicid)
        status = 0
        for _ in range(2):
            self.write_apic(APIC_ESR, 0)
            self.icr_write(APIC_DM_STARTUP | start_eip >> 12, apicid)
            status = self.read_apic(APIC_ESR) & 0xEF
        return status

    # ===================================================================================
    # IPIs (apic->send_IPI_*)
    # ===================================================================================
    def send_IPI(self, target: int, vector: int) -> None:
        """``apic->send_IPI``: one CPU."""
        # Fast tests first (plain ints in range), as Guest.cpumask and _vector do; else the
        # full checks.
        if type(target) is not int or not 0 <= target < self.ncpus:
            check_int("target", target, 0, self.ncpus - 1)
        if type(vector) is not int or not 0 <= vector <= 0xFF:
            vector = check_int("vector", vector, 0, 0xFF)
        self.driver.send_IPI(self, target, vector)

    def send_IPI_mask(self, cpus: Iterable[int], vector: int) -> None:
        """``apic->send_IPI_mask``: every CPU in ``cpus`` (self included if listed)."""
        self.driver.send_IPI_mask(self, self.guest.cpumask(cpus), _vector(vector))

    def send_IPI_mask_allbutself(self, cpus: Iterable[int], vector: int) -> None:
        """``apic->send_IPI_mask_allbutself``: every CPU in ``cpus`` but this one."""
        self.driver.send_IPI_mask_allbutself(self, self.guest.cpumask(cpus), _vector(vector))

    def send_IPI_allbutself(self, vector: int) -> None:
        """``apic->send_IPI_allbutself``: the all-excluding-self shorthand."""
        self.driver.send_IPI_allbutself(self, _vector(vector))

    def send_IPI_all(self, vector: int) -> None:
        """``apic->send_IPI_all``: the all-including-self shorthand."""
        self.driver.send_IPI_all(self, _vector(vector))

    def send_IPI_self(self, vector: int) -> None:
        """``apic->send_IPI_self``: the self shorthand."""
        self.driver.send_IPI_self(self, _vector(vector))

    # ===================================================================================
    # Boot
    # ===================================================================================
    def boot(self) -> tuple[int, int]:
        """Set up this CPU's APIC like Linux; returns ``(apicid, logical_apicid)`` read back."""
        driver = self.guest.driver
        driver.enable(self)
        driver.init_apic_ldr(self)
        self.write_apic(APIC_SPIV, APIC_SPIV_APIC_ENABLED | SPURIOUS_APIC_VECTOR)
        self.write_apic(APIC_TASKPRI, 0)
        if self.x2apic:
            return self.read_apic(APIC_ID), self.read_apic(APIC_LDR)
        return self.read_apic(APIC_ID) >> 24, self.read_apic(APIC_LDR) >> 24

    @property
    def apicid(self) -> int:
        return self.guest.cpu_to_apicid[self.index]

    def __repr__(self) -> str:
        return f"<GuestCpu {self.index} apicid={self.apicid:#x} {self.guest.driver.name}>"


def checked_cpumask(cpus: Iterable[int], ncpus: int) -> list[int]:
    """The full check behind ``Guest.cpumask`` (no fast path): every element of ``cpus`` an
    int CPU number in ``0 .. ncpus - 1`` (``ApicTypeError``/``ApicValueError`` naming ``cpu``
    otherwise; ``cpus`` itself must be an iterable other than int/str/bytes); returns the
    numbers without repeats, ascending."""
    try:
        if isinstance(cpus, int | str | bytes):
            raise TypeError
        numbers = iter(cpus)
    except TypeError:
        raise ApicTypeError(
            f"cpus must be an iterable of CPU numbers, not {type(cpus).__name__}"
        ) from None
    return sorted({check_int("cpu", c, 0, ncpus - 1) for c in numbers})


def _vector(vector: int) -> int:
    """``vector`` checked: a plain int in 0..255 passes a fast test, anything else (a bad
    argument, a bool, an int subclass) gets ``check_int``."""
    if type(vector) is int and 0 <= vector <= 0xFF:
        return vector
    return check_int("vector", vector, 0, 0xFF)


class Guest:
    """A Linux-like guest: every vCPU of ``vm`` booted with one APIC driver.

    ``Guest(vm, "x2apic_cluster")``; ``Guest(vm, "kvm_pv", base="physflat")``.
    ``bits_per_long`` = 32 makes an i386 guest: PV IPI windows of 64 IDs, hypercalls made
    outside 64-bit mode.
    """

    def __init__(
        self,
        vm: Vm,
        driver: str = "x2apic_phys",
        *,
        base: str | None = None,
        bits_per_long: int = 64,
    ) -> None:
        check_instance("vm", vm, Vm)
        check_instance("driver", driver, str)
        if base is not None:
            check_instance("base", base, str)
        check_int("bits_per_long", bits_per_long, 32, 64)
        if driver not in DRIVERS:
            raise ApicValueError(f"driver={driver!r} is not one of {DRIVERS}")
        if base is not None and driver != "kvm_pv":
            raise ApicValueError(f"base={base!r} only applies to driver='kvm_pv'")
        if bits_per_long not in (32, 64):
            raise ApicValueError(f"bits_per_long={bits_per_long!r} must be 32 or 64")
        self.vm = vm
        self.bits_per_long = bits_per_long
        if driver == "kvm_pv":
            base = "x2apic_phys" if base is None else base
            if base not in BASE_DRIVERS:
                raise ApicValueError(f"base={base!r} is not one of {tuple(BASE_DRIVERS)}")
        else:
            base = driver
        chosen: Driver = BASE_DRIVERS[base]()
        if driver == "kvm_pv" and pv_ipi_supported(vm):
            chosen = KvmPv(chosen, bits_per_long)
        self.driver: Driver = chosen
        self._check_vm(vm, chosen)

        self.cpu_to_apicid: list[int] = []
        self.cpu_to_logical_apicid: list[int] = []
        self.cpus: tuple[GuestCpu, ...] = tuple(GuestCpu(self, i) for i in range(len(vm)))
        for cpu in self.cpus:
            apicid, logical = cpu.boot()
            self.cpu_to_apicid.append(apicid)
            self.cpu_to_logical_apicid.append(logical)
        for cpu in self.cpus:
            cpu.vcpu.interrupt_handler = cpu._interrupt
            cpu.vcpu.nmi_handler = cpu._nmi

    @staticmethod
    def _check_vm(vm: Vm, driver: Driver) -> None:
        n = len(vm)
        if driver.max_cpus is not None and n > driver.max_cpus:
            raise ApicValueError(
                f"driver {driver.name!r} supports at most {driver.max_cpus} CPUs, the VM has {n}"
            )
        for vcpu in vm.vcpus:
            apic = vcpu.apic
            if vcpu.mp_state is MpState.UNINITIALIZED:
                raise ApicValueError(
                    f"vCPU {vcpu.index} was never started; AP bring-up (INIT/SIPI) is not "
                    "modelled, create the Vm with aps_started=True"
                )
            if not apic.hw_enabled:
                raise ApicValueError(
                    f"vCPU {vcpu.index}'s APIC is disabled (IA32_APIC_BASE.EN = 0); the guest "
                    "does not re-enable it"
                )
            if driver.x2apic:
                if not apic.features.x2apic:
                    raise ApicValueError(
                        f"driver {driver.name!r} needs x2APIC, which vCPU {vcpu.index} lacks"
                    )
            elif apic.x2apic_mode:
                raise ApicValueError(
                    f"driver {driver.name!r} needs vCPU {vcpu.index}'s APIC in xAPIC mode "
                    f"(it is {apic.mode!r})"
                )

    def cpu(self, i: int) -> GuestCpu:
        """CPU number ``i`` (= vCPU index ``i``)."""
        check_int("i", i, 0, len(self.cpus) - 1)
        return self.cpus[i]

    def cpumask(self, cpus: Iterable[int]) -> Sequence[int]:
        """A cpumask: the CPU numbers of ``cpus``, checked, without repeats, ascending.

        Fast path: a list or tuple of plain ints, strictly ascending (so without repeats) and
        in range, is already a cpumask and is returned as it is; anything else (unsorted,
        repeats, bools, int subclasses, other iterables, bad values) is checked one CPU at a
        time and returned as a new sorted list.
        """
        if type(cpus) is list or type(cpus) is tuple:
            last = -1
            for c in cpus:
                if type(c) is not int or c <= last:
                    break
                last = c
            else:
                if last < len(self.cpus):
                    return cpus
        return checked_cpumask(cpus, len(self.cpus))

    def __len__(self) -> int:
        return len(self.cpus)

    def __repr__(self) -> str:
        return f"<Guest {len(self.cpus)} CPUs driver={self.driver!r}>"
