"""The x86-64 trap: recompute a fault address from the faulting instruction and the registers.

Dereferencing a non-canonical pointer (0x5a5a5a5a5a5a5a5a junk, 0xdead000000000100 list poison) is a
general-protection fault, which Linux delivers as SIGSEGV with si_code SI_KERNEL and si_addr 0. Taken
at face value that is a NULL dereference; the real address is the memory operand of the instruction at
$pc evaluated with the crashing thread's registers. gdb prints AT&T syntax:
``disp(%base,%index,scale)``, optionally with a segment prefix (``%fs:0x28``) and, for rip-relative
operands, a ``# 0xADDR <sym>`` comment with the address already computed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MASK64 = (1 << 64) - 1
SI_KERNEL = 0x80

_REG64 = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
# 32-bit register names → (64-bit register, mask): used by addr32-prefixed operands.
_SUBREG: dict[str, tuple[str, int]] = {r: (r, MASK64) for r in _REG64 + ["rip"]}
for _r in ["ax", "bx", "cx", "dx", "si", "di", "bp", "sp"]:
    _SUBREG["e" + _r] = ("r" + _r, 0xFFFFFFFF)
for _i in range(8, 16):
    _SUBREG[f"r{_i}d"] = (f"r{_i}", 0xFFFFFFFF)
_SUBREG["eip"] = ("rip", 0xFFFFFFFF)

# Mnemonics whose "memory-looking" operand is not an access.
_NO_ACCESS = re.compile(r"^(?:lea[wlq]?|nop[wlq]?|prefetch\w*|endbr64|endbr32)$")
# Branches take a bare number as a direct target, not as an absolute memory operand.
_BRANCH = re.compile(r"^(?:j\w+|call[q]?|loop\w*|xbegin)$")
_READ_ONLY_DEST = re.compile(r"^(?:cmp(?!xchg)\w*|test\w*|bt[wlq]?|ucomis[sd]|comis[sd]|vucomis[sd]|vcomis[sd]|ptest|vptest)$")
_PREFIXES = {"lock", "rep", "repz", "repe", "repnz", "repne", "notrack", "bnd", "data16", "addr32", "cs", "ds",
             "es", "ss", "fs", "gs", "rex", "rex.w", "xacquire", "xrelease"}

_MEM = re.compile(
    r"^(?:%(?P<seg>[cdefgs]s):)?(?P<disp>-?(?:0x[0-9a-fA-F]+|\d+))?"
    r"\((?:%(?P<base>[a-z0-9]+))?(?:,(?:%(?P<index>[a-z0-9]+))?(?:,(?P<scale>[1248]))?)?\)$"
)
_ABS = re.compile(r"^(?:%(?P<seg>[cdefgs]s):)?(?P<disp>0x[0-9a-fA-F]+|\d+)$")
_COMMENT_ADDR = re.compile(r"#\s*(0x[0-9a-fA-F]+)")


@dataclass(frozen=True)
class MemOperand:
    text: str
    disp: int = 0
    base: str | None = None
    index: str | None = None
    scale: int = 1
    segment: str | None = None
    indirect_branch: bool = False  # "*0x8(%rax)" in call/jmp: a load of the branch target


@dataclass(frozen=True)
class Instruction:
    address: int | None
    mnemonic: str
    operands: list[str]
    text: str  # as gdb printed it, after the address/symbol
    comment_address: int | None = None  # gdb's "# 0xADDR <sym>": a rip-relative operand, resolved


@dataclass(frozen=True)
class FaultAddress:
    address: int
    access: str  # "read" | "write" | "exec"
    operand: str  # the operand it came from, or a register for a branch target
    how: str  # human-readable: "0x20(%rax) with rax=0xa5a5a5a5a5a5a5a5"


def is_canonical(addr: int) -> bool:
    """x86-64 with 48-bit virtual addresses: bits 63..47 all equal. (With 5-level paging the
    limit is 57 bits; 48 is what the kernel uses unless an mmap hint asks for more.)"""
    top = addr >> 47
    return top == 0 or top == (1 << 17) - 1


def split_operands(s: str) -> list[str]:
    out, depth, cur = [], 0, []
    for c in s:
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


_GDB_LINE = re.compile(r"^(?:=>)?\s*(0x[0-9a-fA-F]+)(?:\s*<[^>]*>)?:\s*(.*)$")


def parse_gdb_instruction(line: str) -> Instruction | None:
    """Parse one line of gdb's ``x/i`` output: ``=> 0x5555… <fn+4>:\taddq   $0x1,0x20(%rax)``."""
    m = _GDB_LINE.match(line.strip())
    if not m:
        return None
    address = int(m.group(1), 16)
    text = m.group(2).strip()
    body, _, comment = text.partition("#")
    body = body.strip()
    cm = _COMMENT_ADDR.match("#" + comment) if comment else None
    comment_address = int(cm.group(1), 16) if cm else None
    words = body.split()
    while words and words[0] in _PREFIXES:
        words.pop(0)
    if not words:
        return Instruction(address, "", [], text, comment_address)
    mnemonic = words[0]
    operands = split_operands(" ".join(words[1:]))
    return Instruction(address, mnemonic, operands, text, comment_address)


def memory_operands(insn: Instruction) -> list[MemOperand]:
    if _NO_ACCESS.match(insn.mnemonic):
        return []
    ops: list[MemOperand] = []
    for raw in insn.operands:
        op = raw.strip()
        indirect = op.startswith("*")
        if indirect:
            op = op[1:]
        m = _MEM.match(op)
        if m:
            ops.append(MemOperand(
                text=raw, disp=int(m.group("disp"), 0) if m.group("disp") else 0, base=m.group("base"),
                index=m.group("index"), scale=int(m.group("scale") or 1), segment=m.group("seg"),
                indirect_branch=indirect))
            continue
        m = _ABS.match(op)
        # A bare number is an absolute memory operand (moffs, "%fs:0x28"), except as a direct branch target.
        if m and (indirect or not _BRANCH.match(insn.mnemonic)) and not op.startswith("$"):
            ops.append(MemOperand(text=raw, disp=int(m.group("disp"), 0), segment=m.group("seg"),
                                  indirect_branch=indirect))
    return ops


def _reg(name: str, regs: dict[str, int], next_pc: int | None) -> int | None:
    if name in ("rip", "eip"):
        if next_pc is None:
            return None
        return next_pc & (MASK64 if name == "rip" else 0xFFFFFFFF)
    full = _SUBREG.get(name)
    if full is None or full[0] not in regs:
        return None
    return regs[full[0]] & full[1]


def effective_address(op: MemOperand, regs: dict[str, int], next_pc: int | None = None) -> int | None:
    """disp + base + index*scale (+ fs/gs base), wrapped to 64 bits; None if a value is unknown."""
    addr = op.disp
    if op.base:
        v = _reg(op.base, regs, next_pc)
        if v is None:
            return None
        addr += v
    if op.index:
        v = _reg(op.index, regs, next_pc)
        if v is None:
            return None
        addr += v * op.scale
    if op.segment in ("fs", "gs"):
        base = regs.get(f"{op.segment}_base")
        if base is None:
            return None
        addr += base
    return addr & MASK64


def _access(insn: Instruction, op: MemOperand) -> str:
    if op.indirect_branch:
        return "read"
    # AT&T: the destination is the last operand; a one-operand instruction (inc, not, pop) writes it too.
    if insn.operands and insn.operands[-1].strip() == op.text.strip() and not _READ_ONLY_DEST.match(insn.mnemonic):
        if insn.mnemonic.startswith(("push", "call", "jmp")):
            return "read"
        return "write"
    return "read"


def recompute_fault_address(insn: Instruction, regs: dict[str, int], next_pc: int | None = None) -> FaultAddress | None:
    """The address the faulting instruction tried to use. Prefers a non-canonical operand (that is
    what raises #GP); handles ``jmp *%reg``/``call *%reg`` to a non-canonical target as an exec fault."""
    candidates: list[FaultAddress] = []
    for op in memory_operands(insn):
        if op.base in ("rip", "eip") and insn.comment_address is not None:
            addr: int | None = insn.comment_address  # gdb already resolved it
        else:
            addr = effective_address(op, regs, next_pc)
        if addr is None:
            continue
        parts = []
        for r in (op.base, op.index):
            if r and r not in ("rip", "eip"):
                v = _reg(r, regs, next_pc)
                if v is not None:
                    parts.append(f"{r}={v:#x}")
        how = f"{op.text.strip()} with {', '.join(parts)}" if parts else op.text.strip()
        candidates.append(FaultAddress(addr, _access(insn, op), op.text.strip(), how))
    # Register-indirect branch: "jmp *%rax" to a non-canonical target faults on the branch itself.
    if not candidates and _BRANCH.match(insn.mnemonic):
        for raw in insn.operands:
            if raw.startswith("*%"):
                v = _reg(raw[2:], regs, next_pc)
                if v is not None:
                    candidates.append(FaultAddress(v, "exec", raw, f"branch target {raw[1:]}={v:#x}"))
    if not candidates:
        return None
    for c in candidates:
        if not is_canonical(c.address):
            return c
    return candidates[0]
