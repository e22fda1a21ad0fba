"""Frames, signal info, registers and the faulting instruction from a core, without the process.

Two tools, run as argv lists with timeouts (the runner calls us from a worker thread):
- ``eu-stack`` for symbolized frames of every thread and the module list with build ids (fast: it only
  unwinds; tens of ms even for a big core);
- ``gdb -batch -nx --readnever`` for ``$_siginfo``, registers, ``x/2i $pc`` and glibc's abort message.
  --readnever skips DWARF (gdb is not asked for frames), which cuts gdb from ~300 ms to ~70 ms.
Outputs go to temporary files, not pipes, so a huge output never sits in our memory: we parse at most
MAX_OUTPUT bytes. A missing tool is a result (``ToolRun.error``), never an exception.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .frames import Frame, ThreadStack
from .x86 import Instruction, parse_gdb_instruction

MAX_OUTPUT = 16 << 20
MAX_FRAMES = 256  # per thread; deep recursion is recognised from the top frames alone

TOOL_PACKAGES = {"eu-stack": "elfutils", "eu-unstrip": "elfutils", "gdb": "gdb", "zstd": "zstd"}


@dataclass
class ToolRun:
    argv: list[str]
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    error: str | None = None  # tool missing, timed out, could not start
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    # Never fetch debug info over the network from inside a crash handler.
    env.pop("DEBUGINFOD_URLS", None)
    env["LC_ALL"] = "C"
    return env


def _read_capped(f: IO[bytes]) -> tuple[str, bool]:
    f.seek(0)
    data = f.read(MAX_OUTPUT + 1)
    return data[:MAX_OUTPUT].decode("utf-8", "replace"), len(data) > MAX_OUTPUT


class _Running:
    """A started tool; several run at once so triage costs max(tools), not their sum."""

    def __init__(self, argv: list[str], timeout: float):
        self.run = ToolRun(argv=list(argv))
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.t0 = time.monotonic()
        exe = shutil.which(argv[0])
        if exe is None:
            pkg = TOOL_PACKAGES.get(os.path.basename(argv[0]))
            hint = f" (install {pkg})" if pkg else ""
            self.run.error = f"{argv[0]} not found{hint}"
            return
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                [exe, *argv[1:]], stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err,
                env=_tool_env(), close_fds=True, start_new_session=True)
        except OSError as e:
            self.run.error = f"{argv[0]} could not start: {e}"
            self.out.close()
            self.err.close()

    def wait(self) -> ToolRun:
        if self.proc is None:
            return self.run
        remaining = max(0.0, self.timeout - (time.monotonic() - self.t0))
        try:
            self.run.returncode = self.proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by pid
            self.proc.wait()
            self.run.error = f"{self.run.argv[0]} timed out after {self.timeout:g}s"
        self.run.duration = time.monotonic() - self.t0
        self.run.stdout, t1 = _read_capped(self.out)
        self.run.stderr, _ = _read_capped(self.err)
        self.run.output_truncated = t1
        self.out.close()
        self.err.close()
        return self.run


def run_tool(argv: list[str], timeout: float) -> ToolRun:
    return _Running(argv, timeout).wait()


# --- eu-stack ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Module:
    name: str
    start: int
    end: int
    build_id: str | None
    path: str | None  # the ELF file eu-stack used, None if not found ("-")


@dataclass
class StackResult:
    threads: list[ThreadStack] = field(default_factory=list)  # first = the thread that got the signal
    modules: list[Module] = field(default_factory=list)
    tool: str = "eu-stack"
    errors: list[str] = field(default_factory=list)
    run: ToolRun | None = None


def eu_stack_argv(core: Path, executable: Path | None, *, eu_stack: str = "eu-stack",
                  max_frames: int = MAX_FRAMES) -> list[str]:
    # -m module, -b build id + module offset, -s source, -i inlined frames (so -O2 inlining does not
    # change the signature), -l module list with build ids (saves an eu-unstrip run).
    argv = [eu_stack, f"--core={core}", "-m", "-b", "-s", "-i", "-l", "-n", str(max_frames)]
    if executable is not None:
        argv += ["-e", str(executable)]
    return argv


_EU_FRAME = re.compile(r"^#(\d+)\s+0x([0-9a-fA-F]+)(?:\s+(.*))?$")
_EU_TID = re.compile(r"^TID (\d+):$")
_EU_MODULE = re.compile(r"^0x([0-9a-fA-F]+)-0x([0-9a-fA-F]+) (.+)$")
_EU_BUILDID_OFF = re.compile(r"^\[([0-9a-fA-F]*)\]@0x([0-9a-fA-F]+)\+0x([0-9a-fA-F]+)$")


def parse_eu_stack(text: str, *, max_frames: int = MAX_FRAMES) -> tuple[list[ThreadStack], list[Module]]:
    """Parse ``eu-stack -m -b -s -i -l`` output (elfutils 0.18x format)."""
    threads: list[ThreadStack] = []
    modules: list[Module] = []
    cur_thread: ThreadStack | None = None
    frame: dict | None = None
    mod: dict | None = None
    in_modules = False
    mod_path_lines = 0

    def flush_frame() -> None:
        nonlocal frame
        if frame is not None and cur_thread is not None:
            cur_thread.frames.append(Frame(**frame))
        frame = None

    def flush_module() -> None:
        nonlocal mod
        if mod is not None:
            modules.append(Module(**mod))
        mod = None

    for line in text.splitlines():
        if line.startswith("PID "):
            flush_frame()
            flush_module()
            in_modules = line.endswith("module memory map")
            continue
        if in_modules:
            m = _EU_MODULE.match(line)
            if m:
                flush_module()
                mod = {"name": m.group(3).strip(), "start": int(m.group(1), 16), "end": int(m.group(2), 16),
                       "build_id": None, "path": None}
                mod_path_lines = 0
            elif mod is not None and line.startswith("  "):
                s = line.strip()
                if s.startswith("[") and s.endswith("]"):
                    mod["build_id"] = s[1:-1] or None
                else:
                    # First path line is the ELF file ("-" if not found), the second its debug file.
                    mod_path_lines += 1
                    if mod_path_lines == 1 and s != "-":
                        mod["path"] = s
            continue
        m = _EU_TID.match(line)
        if m:
            flush_frame()
            cur_thread = ThreadStack(tid=int(m.group(1)))
            threads.append(cur_thread)
            continue
        m = _EU_FRAME.match(line)
        if m and cur_thread is not None:
            flush_frame()
            rest = (m.group(3) or "").strip()
            func, module = None, None
            if rest.startswith("- "):  # no symbol: "#0 0x… - module"
                module = rest[2:].strip() or None
            elif " - " in rest:
                func, module = rest.rsplit(" - ", 1)
            elif rest:
                func = rest
            if func is not None and func.strip() in ("", "??"):
                func = None
            if len(cur_thread.frames) >= max_frames:  # our own cap, for -n 0 output
                cur_thread.truncated = True
                continue
            frame = {"function": func.strip() if func else None, "module": module.strip() if module else None,
                     "pc": int(m.group(2), 16), "module_offset": None, "source": None, "index": int(m.group(1))}
            continue
        if frame is not None and line.startswith("    "):
            s = line.strip()
            b = _EU_BUILDID_OFF.match(s)
            if b:
                frame["module_offset"] = int(b.group(3), 16)
            elif s and frame["source"] is None:
                frame["source"] = s
    flush_frame()
    flush_module()
    return threads, modules


def eu_stack_result(run: ToolRun) -> StackResult:
    res = StackResult(run=run)
    if run.error:
        res.errors.append(run.error)
        return res
    # Exit 1 means "some frames shown, some errors" (e.g. the frame limit in a deep recursion): usable.
    res.threads, res.modules = parse_eu_stack(run.stdout)
    # "eu-stack: tid 3957: shown max number of frames (256, use -n 0 for unlimited)"
    capped = {int(m) for m in re.findall(r"tid (\d+): shown max number of frames", run.stderr)}
    for t in res.threads:
        if t.tid in capped:
            t.truncated = True
    if run.returncode not in (0, 1) or not res.threads:
        tail = run.stderr.strip().splitlines()[-3:]
        res.errors.append(f"eu-stack exited {run.returncode}: {' | '.join(tail) or 'no output'}")
    if run.output_truncated:
        res.errors.append(f"eu-stack output over {MAX_OUTPUT} bytes: later threads dropped")
    return res


# --- gdb -----------------------------------------------------------------------------------------------

@dataclass
class GdbFacts:
    si_signo: int | None = None
    si_code: int | None = None
    si_addr: int | None = None
    si_pid: int | None = None
    lwp: int | None = None  # the thread gdb selected: the one that received the signal
    registers: dict[str, int] = field(default_factory=dict)
    instructions: list[Instruction] = field(default_factory=list)  # x/2i $pc: the faulting one and the next
    abort_message: str | None = None  # glibc's __abort_msg: assert text, "double free detected in tcache 2"
    threads: list[ThreadStack] = field(default_factory=list)  # only with want_backtrace (eu-stack missing)
    errors: list[str] = field(default_factory=list)
    run: ToolRun | None = None


_SECTIONS = ("SIGINFO", "KILL", "THREAD", "REGS", "INSN", "ABORT", "BT")


def gdb_argv(core: Path, executable: Path | None, *, gdb: str = "gdb", want_backtrace: bool = False) -> list[str]:
    cmds = [
        "set pagination off", "set width 0", "set height 0", "set confirm off", "set print elements 2000",
        "echo @@SIGINFO\\n",
        'printf "%d %d %lu\\n", $_siginfo.si_signo, $_siginfo.si_code, (unsigned long)$_siginfo._sifields._sigfault.si_addr',
        "echo @@KILL\\n",
        'printf "%d\\n", $_siginfo._sifields._kill.si_pid',
        "echo @@THREAD\\n", "thread",
        "echo @@REGS\\n", "info registers",
        "echo @@INSN\\n", "x/2i $pc",
        # glibc keeps the abort reason in __abort_msg (struct {unsigned size; char msg[];} *).
        "echo @@ABORT\\n", "x/s *(char **)&__abort_msg + 4",
    ]
    if want_backtrace:
        cmds += ["echo @@BT\\n", f"thread apply all bt {MAX_FRAMES}"]
    cmds += ["echo @@END\\n"]
    argv = [gdb, "-batch", "-nx", "-iex", "set debuginfod enabled off", "-iex", "set auto-load off"]
    if not want_backtrace:
        # No DWARF (ours or separate debug files): registers and x/i need none, and it is most of
        # gdb's start-up time. The backtrace fallback needs it, so keeps it.
        argv[3:3] = ["--readnever", "-iex", "set debug-file-directory /nonexistent"]
    for c in cmds:
        argv += ["-ex", c]
    if executable is not None:
        argv.append(str(executable))
    argv += ["--core", str(core)]
    return argv


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    cur: str | None = None
    for line in text.splitlines():
        if line.startswith("@@") and line[2:].strip() in (*_SECTIONS, "END"):
            cur = line[2:].strip()
            out.setdefault(cur, [])
            continue
        if cur is not None:
            out[cur].append(line)
    return out


_REG_LINE = re.compile(r"^([a-z][a-z0-9_]*)\s+(0x[0-9a-fA-F]+)\b")
_LWP = re.compile(r"\(LWP (\d+)\)")
_BT_THREAD = re.compile(r"^Thread \d+ \(.*?(?:LWP (\d+))?.*\):$")
_BT_FRAME = re.compile(
    r"^#(\d+)\s+(?:0x([0-9a-fA-F]+) in )?(.+?)(?: \(.*?\))?(?: at (\S+))?(?: from (\S+))?$")


def _unescape(s: str) -> str:
    s = s.strip()
    if s.startswith('"'):
        end = s.rfind('"')
        try:
            v = ast.literal_eval(s[: end + 1])
            return v if isinstance(v, str) else s
        except (ValueError, SyntaxError):
            return s.strip('"')
    return s


def parse_gdb(text: str, *, executable_name: str | None = None) -> GdbFacts:
    facts = GdbFacts()
    sec = _sections(text)
    for line in sec.get("SIGINFO", []):
        parts = line.split()
        if len(parts) == 3 and all(re.fullmatch(r"-?\d+", p) for p in parts):
            facts.si_signo, facts.si_code, facts.si_addr = int(parts[0]), int(parts[1]), int(parts[2])
    for line in sec.get("KILL", []):
        if re.fullmatch(r"-?\d+", line.strip()):
            facts.si_pid = int(line.strip())
    for line in sec.get("THREAD", []):
        m = _LWP.search(line)
        if m:
            facts.lwp = int(m.group(1))
    for line in sec.get("REGS", []):
        m = _REG_LINE.match(line)
        if m:
            facts.registers[m.group(1)] = int(m.group(2), 16)
    for line in sec.get("INSN", []):
        insn = parse_gdb_instruction(line)
        if insn is not None:
            facts.instructions.append(insn)
    for line in sec.get("ABORT", []):
        if ":" in line and '"' in line:
            facts.abort_message = _unescape(line.split(":", 1)[1]).strip() or None
    if "BT" in sec:
        facts.threads = parse_gdb_bt(sec["BT"], executable_name=executable_name)
    return facts


def parse_gdb_bt(lines: list[str], *, executable_name: str | None = None) -> list[ThreadStack]:
    """Fallback frames from ``thread apply all bt`` (used only when eu-stack is missing). gdb lists
    threads from the highest number down; thread 1 is the one that got the signal, so it goes first."""
    threads: list[tuple[int, ThreadStack]] = []
    cur: ThreadStack | None = None
    for line in lines:
        if line.startswith("Thread "):
            m = _LWP.search(line)
            num = int(line.split()[1])
            cur = ThreadStack(tid=int(m.group(1)) if m else None)
            threads.append((num, cur))
            continue
        m = _BT_FRAME.match(line.strip())
        if m and cur is not None:
            func = m.group(3).strip()
            if func == "<signal handler called>":
                fn: str | None = "__restore_rt"
            elif func == "??":
                fn = None
            else:
                fn = func
            # gdb names the module only for objects without debug info ("from /lib/…"); guessing
            # the executable for the others would put libc frames in it.
            module = m.group(5)
            cur.frames.append(Frame(function=fn, module=os.path.basename(module) if module else None,
                                    pc=int(m.group(2), 16) if m.group(2) else None, source=m.group(4),
                                    index=int(m.group(1))))
    threads.sort(key=lambda t: t[0])
    return [t for _, t in threads]


def gdb_result(run: ToolRun, *, executable_name: str | None = None) -> GdbFacts:
    if run.error:
        facts = GdbFacts(run=run)
        facts.errors.append(run.error)
        return facts
    facts = parse_gdb(run.stdout, executable_name=executable_name)
    facts.run = run
    if facts.si_signo is None:
        facts.errors.append("gdb: no $_siginfo in this core")
    if not facts.registers:
        tail = [l for l in run.stderr.strip().splitlines() if not l.startswith("warning:")][-3:]
        facts.errors.append(f"gdb exited {run.returncode} without registers: {' | '.join(tail) or 'no output'}")
    return facts


# --- build ids via eu-unstrip (when eu-stack's module list is unavailable) ----------------------------

def parse_eu_unstrip(text: str) -> list[Module]:
    """``eu-unstrip -n --core`` lines: ``0xSTART+0xSIZE BUILDID@0xADDR FILE DEBUGFILE MODULENAME``."""
    mods = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or "+" not in parts[0]:
            continue
        start_s, size_s = parts[0].split("+", 1)
        bid = parts[1].split("@", 1)[0]
        try:
            start, size = int(start_s, 16), int(size_s, 16)
        except ValueError:
            continue
        path = parts[2] if parts[2] not in ("-", ".") else None
        mods.append(Module(name=parts[4], start=start, end=start + size,
                           build_id=bid if bid and bid != "-" else None, path=path))
    return mods
