"""A tiny x86-64 machine-code builder: exactly the instructions the KVM backend's guest runs.

Every encoding is written out from the Intel SDM Vol. 2 opcode tables (ModRM ``mod=00``,
``r/m=111`` = ``[rdi]``; ``r/m=100`` + SIB ``0x25`` = absolute disp32).  Nothing here is
general: an :class:`Asm` appends bytes and can tell the offset of what it emitted.
"""

from __future__ import annotations

from lapic.faults import ApicValueError

_SIZES = (1, 2, 4, 8)


def _check_size(size: int) -> None:
    if size not in _SIZES:
        raise ApicValueError(f"size must be one of {_SIZES}, got {size}")


class Asm:
    """Appends instructions to a byte string; ``len(asm)`` is the current offset."""

    def __init__(self) -> None:
        self.code = bytearray()

    def __len__(self) -> int:
        return len(self.code)

    def emit(self, *parts: int | bytes) -> Asm:
        for p in parts:
            if isinstance(p, int):
                self.code.append(p)
            else:
                self.code += p
        return self

    # -- data movement through [rdi] -----------------------------------------------------------
    def load_rdi(self, size: int) -> Asm:
        """Read ``size`` bytes at ``[rdi]`` into RAX, zero-extended."""
        _check_size(size)
        if size == 1:
            return self.emit(0x0F, 0xB6, 0x07)  # movzx eax, byte [rdi]
        if size == 2:
            return self.emit(0x0F, 0xB7, 0x07)  # movzx eax, word [rdi]
        if size == 4:
            return self.emit(0x8B, 0x07)  # mov eax, [rdi]
        return self.emit(0x48, 0x8B, 0x07)  # mov rax, [rdi]

    def store_rdi(self, size: int) -> Asm:
        """Write the low ``size`` bytes of RAX to ``[rdi]``."""
        _check_size(size)
        if size == 1:
            return self.emit(0x88, 0x07)  # mov [rdi], al
        if size == 2:
            return self.emit(0x66, 0x89, 0x07)  # mov [rdi], ax
        if size == 4:
            return self.emit(0x89, 0x07)  # mov [rdi], eax
        return self.emit(0x48, 0x89, 0x07)  # mov [rdi], rax

    # -- MSRs ---------------------------------------------------------------------------------
    def rdmsr(self) -> Asm:
        return self.emit(0x0F, 0x32)

    def wrmsr(self) -> Asm:
        return self.emit(0x0F, 0x30)

    # -- CR8 ----------------------------------------------------------------------------------
    def mov_cr8_rax(self) -> Asm:
        """``mov %rax, %cr8`` (REX.R 0F 22 /r, ModRM 11 000 000)."""
        return self.emit(0x44, 0x0F, 0x22, 0xC0)

    def mov_rax_cr8(self) -> Asm:
        """``mov %cr8, %rax`` (REX.R 0F 20 /r, ModRM 11 000 000)."""
        return self.emit(0x44, 0x0F, 0x20, 0xC0)

    # -- control ------------------------------------------------------------------------------
    def mov_al_imm8(self, value: int) -> Asm:
        return self.emit(0xB0, value & 0xFF)

    def out_al(self, port: int) -> Asm:
        """``out imm8, al``."""
        if not 0 <= port <= 0xFF:
            raise ApicValueError(f"port must fit in 8 bits, got {port:#x}")
        return self.emit(0xE6, port)

    def inc_gs_qword(self, disp: int = 0) -> Asm:
        """``inc qword gs:[disp32]`` (absolute, through the GS base)."""
        return self.emit(0x65, 0x48, 0xFF, 0x04, 0x25, (disp & 0xFFFFFFFF).to_bytes(4, "little"))

    def iretq(self) -> Asm:
        return self.emit(0x48, 0xCF)

    def vmcall(self) -> Asm:
        return self.emit(0x0F, 0x01, 0xC1)

    def hlt(self) -> Asm:
        return self.emit(0xF4)

    def jmp_self(self) -> Asm:
        return self.emit(0xEB, 0xFE)

    def jmp_to(self, target: int) -> Asm:
        """``jmp rel8`` to offset ``target`` of this code (within -128..127 of the next
        instruction)."""
        rel = target - (len(self.code) + 2)
        if not -128 <= rel <= 127:
            raise ApicValueError(f"target {target:#x} is out of rel8 range ({rel})")
        return self.emit(0xEB, rel & 0xFF)

    def align(self, boundary: int, fill: int = 0xCC) -> Asm:
        while len(self.code) % boundary:
            self.code.append(fill)
        return self

    def bytes(self) -> bytes:
        return bytes(self.code)
