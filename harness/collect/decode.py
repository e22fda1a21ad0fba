"""The faulting instruction, decoded by capstone from the bytes at pc, and the address it used.

The bytes come from the core when it holds that memory, else from the file the core's NT_FILE note says was
mapped there (code pages of mapped files are not dumped by default). Capstone knows every form gdb prints,
AVX-512 included (``vmovdqu8 %ymm16,(%rdi){%k1}``, as glibc's memcpy/memset use where the CPU has it), and
says which operands are read and written; the effective address is disp + base + index*scale (+ fs/gs base)
from the crashing thread's registers. A vector index (gather/scatter) has no single address: unknown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from capstone import CS_AC_WRITE, CS_ARCH_X86, CS_MODE_64, CS_OPT_SYNTAX_ATT, Cs, CsError
from capstone.x86 import X86_OP_MEM, X86_OP_REG

from .elfcore import CoreInfo
from .x86 import _READ_ONLY_DEST, MASK64, FaultAddress, _reg, is_canonical

MAX_INSN = 15


@dataclass(frozen=True)
class Decoded:
    address: int
    text: str            # AT&T syntax, as gdb would print it
    size: int
    source: str          # "core" or the file the bytes were read from
    fault: FaultAddress | None


def code_at(core: Path, info: CoreInfo, pc: int, size: int = MAX_INSN) -> tuple[bytes, str] | None:
    """Up to ``size`` bytes at ``pc``: from the core's memory, or from the mapped file it names."""
    segment = info.segment_at(pc)
    if segment is not None and pc - segment.start < segment.file_size:
        available = min(size, segment.file_size - (pc - segment.start))
        try:
            with open(core, "rb") as handle:
                handle.seek(segment.offset + pc - segment.start)
                data = handle.read(available)
            if data:
                return data, "core"
        except OSError:
            pass
    mapped = info.file_at(pc)
    if mapped is None or mapped.deleted:
        return None
    try:
        fd = os.open(mapped.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.pread(fd, min(size, mapped.end - pc), mapped.offset + pc - mapped.start)
    finally:
        os.close(fd)
    return (data, mapped.path) if data else None


def _disassembler() -> Cs:
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    md.syntax = CS_OPT_SYNTAX_ATT
    return md


def decode(code: bytes, pc: int, regs: dict[str, int], source: str = "bytes") -> Decoded | None:
    """The instruction at ``pc`` and the address it tried to use (the non-canonical one, if several)."""
    try:
        insn = next(_disassembler().disasm(code, pc, 1), None)
    except CsError:
        return None
    if insn is None:
        return None
    text = f"{insn.mnemonic} {insn.op_str}".strip()
    next_pc = pc + insn.size
    candidates: list[FaultAddress] = []
    mnemonic = insn.mnemonic.split()[-1] if insn.mnemonic else ""
    is_lea = mnemonic.startswith("lea") or mnemonic.startswith("nop") or mnemonic.startswith("prefetch")
    # Capstone's read/write flags are wrong for many vector moves (a vmovdqu store reads as "read"): in AT&T
    # order the last operand (an AVX-512 mask register aside) is the destination, written unless the
    # instruction only compares.
    operands = list(insn.operands)
    real = [op for op in operands
            if not (op.type == X86_OP_REG and insn.reg_name(op.reg) in {f"k{i}" for i in range(8)})]
    destination = real[-1] if real else None
    writes_destination = not _READ_ONLY_DEST.match(mnemonic)
    for op in operands:
        if op.type != X86_OP_MEM or is_lea:
            continue
        mem = op.mem
        base = insn.reg_name(mem.base) if mem.base else None
        index = insn.reg_name(mem.index) if mem.index else None
        segment = insn.reg_name(mem.segment) if mem.segment else None
        address = mem.disp
        parts = []
        known = True
        for name, scale in ((base, 1), (index, mem.scale)):
            if not name:
                continue
            value = _reg(name, regs, next_pc)
            if value is None:       # a vector index (VSIB) or a register the core did not give
                known = False
                break
            address += value * scale
            if name not in ("rip", "eip"):
                parts.append(f"{name}={value:#x}")
        if not known:
            continue
        if segment in ("fs", "gs"):
            seg_base = regs.get(f"{segment}_base")
            if seg_base is None:
                continue
            address += seg_base
        address &= MASK64
        access = "write" if op.access & CS_AC_WRITE or (op is destination and writes_destination) else "read"
        if mnemonic in ("call", "callq", "jmp", "jmpq") or mnemonic.startswith(("call", "jmp")):
            access = "read"      # the branch target is loaded from memory
        operand = _operand_text(base, index, mem.scale, mem.disp, segment)
        how = f"{operand} with {', '.join(parts)}" if parts else operand
        candidates.append(FaultAddress(address, access, operand, how))
    if not candidates and (mnemonic.startswith(("call", "jmp"))) and operands and \
            operands[0].type == X86_OP_REG:
        name = insn.reg_name(operands[0].reg)
        value = _reg(name, regs, next_pc)
        if value is not None:
            candidates.append(FaultAddress(value, "exec", f"*%{name}", f"branch target {name}={value:#x}"))
    if not candidates and mnemonic.startswith(("push", "call")) and "rsp" in regs:
        candidates.append(FaultAddress((regs["rsp"] - 8) & MASK64, "write", "(%rsp)", f"push below rsp={regs['rsp']:#x}"))
    elif not candidates and mnemonic.startswith(("pop", "ret")) and "rsp" in regs:
        candidates.append(FaultAddress(regs["rsp"], "read", "(%rsp)", f"pop at rsp={regs['rsp']:#x}"))
    fault = next((c for c in candidates if not is_canonical(c.address)), candidates[0] if candidates else None)
    return Decoded(pc, text, insn.size, source, fault)


def _operand_text(base: str | None, index: str | None, scale: int, disp: int, segment: str | None) -> str:
    inner = f"%{base}" if base else ""
    if index:
        inner += f",%{index},{scale}"
    text = (f"{disp:#x}" if disp >= 0 else f"-{-disp:#x}") if disp or not (base or index) else ""
    text += f"({inner})" if inner else ""
    return f"%{segment}:{text}" if segment else text


def decode_at_pc(core: Path, info: CoreInfo | None, pc: int | None, regs: dict[str, int]) -> Decoded | None:
    if info is None or pc is None:
        return None
    code = code_at(core, info, pc)
    if code is None:
        return None
    return decode(code[0], pc, regs, code[1])
