"""Child processes of the tests and benchmarks (registrars, SIPp, Kamailio, etcd, the control plane's servers):
each in a session of its own with its output in files, stopped by its own PID, never by name; and the CPU a
process tree used, read from /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcessExited(RuntimeError):
    """A child process ended while something waited on it."""


class Proc:
    """One child process run from ``workdir``, stdout and stderr in ``<workdir>/<name>.stdout`` and ``.stderr``
    (stdout discarded with ``stdout=False``: SIPp's screen)."""

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        workdir: Path,
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        stdout: bool = True,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.stdout_path = self.workdir / f"{name}.stdout"
        self.stderr_path = self.workdir / f"{name}.stderr"
        out = open(self.stdout_path, "wb") if stdout else subprocess.DEVNULL  # noqa: SIM115
        err = open(self.stderr_path, "wb")  # noqa: SIM115
        try:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]
            err.close()
        self.pid = self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0, first: int = signal.SIGTERM) -> int:
        """Send ``first``, wait ``timeout``, then SIGKILL; then kill what is left in its process group (children
        share the session started for this PID: Kamailio's workers)."""
        if self.popen.poll() is None:
            self.send_signal(first)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.popen.returncode

    def stdout(self) -> str:
        return _read(self.stdout_path)

    def stderr(self) -> str:
        return _read(self.stderr_path)

    def output(self) -> str:
        """stdout then stderr."""
        return self.stdout() + "\n" + self.stderr()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.output().strip().splitlines()[-n:])

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of one process (all its threads), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the comm field: state(0) ppid(1) … utime(11) stime(12)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of a process and all its live descendants (Kamailio's workers), seconds."""
    return sum(cpu_seconds(p) for p in process_tree(pid))
