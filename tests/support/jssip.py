"""A JsSIP user agent under node (jssip/phone.js next to this module) as a phone of the integration tests: a
WebSocket SIP client written outside this project. Its npm packages, pinned by jssip/package-lock.json, are
installed once with ``npm ci`` into ``$MIDREG_CACHE/npm/jssip-<hash of the package files>`` (outside the repo,
shared by clones, a new folder whenever the pins change); the phone's events are JSON lines on its stdout."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.process import Proc
from tests.support.wait import wait_for

PACKAGE_DIR = Path(__file__).resolve().parent / "jssip"
PHONE_JS = PACKAGE_DIR / "phone.js"
PACKAGE_FILES = ("package.json", "package-lock.json")

Event = dict[str, Any]


class NpmInstallError(RuntimeError):
    """``npm ci`` failed (its output in the message): the test fails on it rather than skipping."""


def cache_root() -> Path:
    return Path(os.environ.get("MIDREG_CACHE") or Path.home() / ".cache" / "kube-midregistrar") / "npm"


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise NpmInstallError(f"{name} not found on PATH: the JsSIP phone needs Node.js 20 and npm")
    return found


def node_modules() -> Path:
    """The ``node_modules`` folder holding jssip and ws, installed by ``npm ci`` unless already cached. A lock
    keeps two test processes from installing at once; the install goes to a scratch folder renamed into place
    on success, so a folder in the cache is always complete."""
    digest = hashlib.sha256()
    for name in PACKAGE_FILES:
        digest.update((PACKAGE_DIR / name).read_bytes())
    root = cache_root()
    target = root / f"jssip-{digest.hexdigest()[:16]}"
    if (target / "node_modules").is_dir():
        return target / "node_modules"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "node_modules").is_dir():
            return target / "node_modules"
        scratch = root / f".{target.name}.{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        for name in PACKAGE_FILES:
            shutil.copyfile(PACKAGE_DIR / name, scratch / name)
        # --ignore-scripts: neither package needs an install script, and none should run on a test machine.
        p = subprocess.run(
            [_tool("npm"), "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if p.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise NpmInstallError(f"npm ci in {scratch} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        os.replace(scratch, target)
    return target / "node_modules"


class JsSipPhone:
    """``node phone.js URL AOR EXPIRES RING``: JsSIP registers ``aor`` over ``url`` every ``expires`` s (it
    refreshes 5 s before a lifetime of 64 s or less runs out) and rejects incoming calls with 486 ``ring`` s
    after its 180 (an early dialog to send requests in). ``ca`` is trusted for wss: through NODE_EXTRA_CA_CERTS, on top of the system's CAs, never instead
    of verifying. Stopped by PID."""

    def __init__(
        self, url: str, aor: str, expires: int, workdir: Path, *, ca: Path | None = None, ring: float = 0
    ) -> None:
        env = {"NODE_PATH": str(node_modules())}
        if ca is not None:
            env["NODE_EXTRA_CA_CERTS"] = str(ca)
        self.proc = Proc(
            [_tool("node"), PHONE_JS, url, aor, str(expires), str(ring)], Path(workdir), "jssip", env=env
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self, name: str | None = None) -> list[Event]:
        """Every complete event line so far (of one ``name`` when given)."""
        out = []
        for line in self.proc.stdout().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    out.append(event)
        return out

    def wait_event(
        self, name: str, timeout: float = 15.0, where: Callable[[Event], bool] = lambda _: True
    ) -> Event:
        """The first ``name`` event that satisfies ``where``; fails with the phone's output if it never
        comes, at once if node exits."""

        def found() -> Event | None:
            return next((e for e in self.events(name) if where(e)), None)

        event = wait_for(found, timeout, f"JsSIP event {name!r}", interval=0.05, proc=self.proc)
        assert event is not None  # wait_for returns only a truthy value
        return event

    def sip_in(self, line_prefix: str, method: str) -> list[Event]:
        """Messages received whose first line starts with ``line_prefix`` and whose CSeq is of ``method``."""
        return [
            e
            for e in self.events("sip_in")
            if str(e.get("line", "")).startswith(line_prefix) and str(e.get("cseq", "")).endswith(method)
        ]

    def tail(self, n: int = 40) -> str:
        """The last ``n`` events, then the end of JsSIP's debug log: what a failed assertion shows."""
        events = self.proc.stdout().strip().splitlines()[-n:]
        debug = self.proc.stderr().strip().splitlines()[-n:]
        return "\n".join([*events, "--- JsSIP debug log (end) ---", *debug])

    def stop(self) -> None:
        self.proc.stop(timeout=5)

    def __enter__(self) -> JsSipPhone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
