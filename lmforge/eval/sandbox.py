"""Run model-written Python (a solution plus its tests) in a separate, limited process — never in ours.

`run_python(code, tests)` writes `code + tests` to `program.py` in a fresh temporary directory and runs it
with the interpreter that runs lmforge. The verdict: "passed" (exit status 0), "failed" (an exception, a
failed assert, a non-zero exit, a memory or output limit hit), or "timeout" (wall clock or CPU limit).

What is enforced, and how:
- Wall-clock time: the parent kills the child's whole process group after `timeout_s`.
- CPU time, address space (memory), size of written files, no core dumps: `resource` limits (RLIMIT_CPU,
  RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_CORE) set inside the child before the program runs; children it spawns
  inherit them. A program cannot raise them again unless it holds CAP_SYS_RESOURCE in the initial user
  namespace (i.e. runs as real root without the network namespace below).
- Network: where unprivileged user namespaces work (`unshare -rn`, most Linux machines), the program runs
  in an empty network namespace — no interfaces but a downed loopback, so no connection of any kind, even
  through raw syscalls. Everywhere, a `sitecustomize` guard also makes Python's socket API refuse
  non-Unix-domain sockets (connect, bind, sendto, getaddrinfo, create_connection); that layer alone stops
  ordinary library code (urllib, requests, socket), not a determined program (ctypes, `_socket`).
- Environment: only PATH, LANG, HOME/TMPDIR (the temp dir) and the guard on PYTHONPATH — no proxies, no
  credentials, no user site-packages; the working directory is the temp dir, deleted afterwards.

What is NOT enforced: file reads outside the temp dir (the program sees the filesystem with this user's
permissions), the number of processes (RLIMIT_NPROC is per user, so it would also count ours), and
isolation from other processes of this user. This is a harness for benchmark code, not a jail for hostile
code: run untrusted workloads in a container or VM as well.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout"]
_OUTPUT_TAIL = 8000  # characters of stdout/stderr kept in a result

# Imported by every Python process started inside the sandbox (the guard dir is first on PYTHONPATH).
_GUARD = r'''
"""lmforge sandbox guard: resource limits and a socket ban, applied before any program code runs."""
import os
import resource
import socket

_limits = os.environ.get("LMFORGE_SANDBOX_LIMITS")
if _limits:
    _cpu, _memory, _fsize = (int(v) for v in _limits.split(","))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _cpu > 0:
        resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
    if _memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (_memory, _memory))
    if _fsize > 0:
        resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))


def _refuse(*args, **kwargs):
    raise PermissionError("network access is disabled in the lmforge sandbox")


def _guarded(method):
    def call(self, *args, **kwargs):
        if self.family != getattr(socket, "AF_UNIX", object()):
            _refuse()
        return method(self, *args, **kwargs)
    return call


for _name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
    if hasattr(socket.socket, _name):
        setattr(socket.socket, _name, _guarded(getattr(socket.socket, _name)))
socket.getaddrinfo = _refuse
socket.create_connection = _refuse
socket.create_server = _refuse
LMFORGE_SANDBOX_ACTIVE = True
'''

# The program runs as __main__ only after the guard is proven loaded (site swallows a failing sitecustomize).
_LAUNCHER = ("import runpy, sys, sitecustomize\n"
             "assert getattr(sitecustomize, 'LMFORGE_SANDBOX_ACTIVE', False), 'sandbox guard not loaded'\n"
             "sys.argv = ['program.py']\n"
             "runpy.run_path('program.py', run_name='__main__')\n")


@dataclass
class SandboxLimits:
    """Limits for one run; 0 disables a resource limit."""

    timeout_s: float = 10.0      # wall clock
    cpu_s: int = 10              # CPU seconds (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 1024        # address space; a bigger allocation raises MemoryError
    file_size_mb: int = 16       # largest file the program (or its captured output) may write
    network_namespace: bool | None = None  # None: use `unshare -rn` when this machine allows it


@dataclass
class SandboxResult:
    """What happened: the verdict, why, the exit code (negative: killed by that signal) and output tails."""

    status: Status
    reason: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """True when `unshare -rn` can start a process in a new user + network namespace here."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _environment(workdir: Path, guard_dir: Path, limits: SandboxLimits) -> dict[str, str]:
    """A minimal environment: nothing inherited except PATH (no proxies, tokens or PYTHON* settings)."""
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "PYTHONPATH": str(guard_dir),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONHASHSEED": "0",
        "LMFORGE_SANDBOX_LIMITS": f"{int(limits.cpu_s)},{int(limits.memory_mb) << 20},{int(limits.file_size_mb) << 20}",
    }


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 4 * _OUTPUT_TAIL))
        return f.read().decode("utf-8", errors="replace")[-_OUTPUT_TAIL:]


def _verdict(returncode: int, stderr: str, limits: SandboxLimits) -> tuple[Status, str]:
    if returncode == 0:
        return "passed", ""
    if returncode < 0:
        sig = -returncode
        # SIGKILL is RLIMIT_CPU's hard stop (a program that ignores SIGXCPU); the parent's own kill after a
        # wall-clock timeout never reaches here, so only the kernel's OOM killer could be mistaken for it
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and limits.cpu_s > 0):
            return "timeout", f"CPU time limit ({limits.cpu_s}s)"
        if sig == signal.SIGXFSZ:
            return "failed", f"file size limit ({limits.file_size_mb} MB)"
        return "failed", f"killed by {signal.Signals(sig).name}"
    if "MemoryError" in stderr:
        return "failed", f"memory limit ({limits.memory_mb} MB)"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return "failed", last or f"exit status {returncode}"


def run_python(code: str, tests: str = "", limits: SandboxLimits | None = None,
               python: str | None = None) -> SandboxResult:
    """Run `code` followed by `tests` as a Python program in the sandbox; see the module docstring."""
    limits = limits or SandboxLimits()
    use_namespace = network_namespace_available() if limits.network_namespace is None else limits.network_namespace
    if use_namespace and not network_namespace_available():
        raise RuntimeError("network_namespace=True, but `unshare -rn` cannot create a network namespace here "
                           "(needs Linux with unprivileged user namespaces); use None to fall back to the guard")
    with tempfile.TemporaryDirectory(prefix="lmforge-sandbox-") as tmp:
        root = Path(tmp)
        workdir, guard_dir = root / "work", root / "guard"
        workdir.mkdir()
        guard_dir.mkdir()
        (guard_dir / "sitecustomize.py").write_text(_GUARD, encoding="utf-8")
        program = code if not tests else f"{code.rstrip()}\n\n\n{tests}"
        (workdir / "program.py").write_text(program + "\n", encoding="utf-8")
        command = [python or sys.executable, "-s", "-B", "-c", _LAUNCHER]
        if use_namespace:
            command = [shutil.which("unshare") or "unshare", "-rn", *command]
        stdout_path, stderr_path = root / "stdout", root / "stderr"
        start = time.monotonic()
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            process = subprocess.Popen(command, cwd=workdir, env=_environment(workdir, guard_dir, limits),
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            try:
                returncode: int | None = process.wait(timeout=limits.timeout_s if limits.timeout_s > 0 else None)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                try:  # the program's own children too: it leads its own session / process group
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        duration = time.monotonic() - start
        stdout, stderr = _tail(stdout_path), _tail(stderr_path)
    if returncode is None:
        return SandboxResult("timeout", f"wall-clock limit ({limits.timeout_s}s)", None, stdout, stderr, duration)
    status, reason = _verdict(returncode, stderr, limits)
    return SandboxResult(status, reason, returncode, stdout, stderr, duration)
