"""The shared part of the fuzz targets: what a target is, how one input is judged, and a seeded mutator.

A target is a function ``bytes -> None`` plus the exceptions its code promises to raise on bad input
(``ParseError`` for ``parse_message``, ``ConfigError`` for the config loader…). Anything else escaping it is a
*crash*; one input taking longer than ``max_ms`` (100 ms) on its best of three runs is a *hang*.

Two engines drive the targets (tests/fuzz/run.py): atheris (libFuzzer, coverage-guided; the long runs) and
:class:`Mutator` below (seeded, no native dependency; the short run in ``make test``, tests/fuzz/test_fuzz.py).
Both go through :class:`Judge`, which times every input, keeps the slowest one, and records each distinct crash
(by exception type and the innermost ``registrar`` frame) with its first reproducer.
"""

from __future__ import annotations

import hashlib
import importlib
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
DICT = HERE / "sip.dict"
# The targets, in the order `run all` runs them: tests/fuzz/targets/<name>.py each defines TARGET.
NAMES = ("message", "uri", "udp", "tcp", "config", "etcd")
MAX_MS = 100.0
MAX_HANGS = 100  # slow inputs kept (the slowest)


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    expected: tuple[type[BaseException], ...] = ()  # what the code promises to raise on bad input
    doc: str = ""
    max_len: int = 65536  # the largest input worth trying (a SIP message's limit, 65,535 bytes)


def load(name: str) -> Target:
    module = importlib.import_module(f"tests.fuzz.targets.{name}")
    target: Target = module.TARGET
    return target


def corpus(name: str) -> list[bytes]:
    folder = CORPUS / name
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()] if folder.is_dir() else []


@dataclass
class Crash:
    signature: str
    data: bytes
    trace: str
    count: int = 1


@dataclass
class Judge:
    """Runs inputs through a target and keeps the verdicts."""

    target: Target
    max_ms: float = MAX_MS
    retries: int = (
        2  # timings again of a slow input before it counts (0 under atheris: timed later, uninstrumented)
    )
    runs: int = 0
    seconds: float = 0.0  # time spent inside the target
    slowest_ms: float = 0.0
    slowest: bytes = b""
    crashes: dict[str, Crash] = field(default_factory=dict)
    hangs: list[tuple[float, bytes]] = field(default_factory=list)

    def __call__(self, data: bytes) -> Crash | None:
        """One input; the crash it caused (None when fine)."""
        self.runs += 1
        elapsed, crash = self._once(data)
        if crash is None and elapsed * 1000 > self.max_ms:
            # Maybe a pause (GC, another process): a hang only if it stays slow, on its best of three runs.
            for _ in range(self.retries):
                elapsed = min(elapsed, self._once(data)[0])
            if elapsed * 1000 > self.max_ms:
                self.hangs.append((elapsed * 1000, data))
                if len(self.hangs) > 2 * MAX_HANGS:  # keep the slowest
                    self.hangs = sorted(self.hangs, key=lambda h: -h[0])[:MAX_HANGS]
        self.seconds += elapsed
        if elapsed * 1000 > self.slowest_ms:
            self.slowest_ms, self.slowest = elapsed * 1000, data
        return crash

    def _once(self, data: bytes) -> tuple[float, Crash | None]:
        start = time.perf_counter()
        try:
            self.target.run(data)
        except self.target.expected:
            pass
        except Exception as exc:  # that is the point: anything else (RecursionError too) is a crash
            elapsed = time.perf_counter() - start
            return elapsed, self._crash(exc, data)
        return time.perf_counter() - start, None

    def _crash(self, exc: BaseException, data: bytes) -> Crash:
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if "/registrar/" in f.filename] or frames
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
        signature = f"{type(exc).__name__}@{where}"
        known = self.crashes.get(signature)
        if known is not None:
            known.count += 1
            if len(data) < len(known.data):  # keep the smallest reproducer
                known.data = data
            return known
        trace = "".join(traceback.format_exception(exc))
        crash = self.crashes[signature] = Crash(signature, data, trace)
        return crash

    @property
    def ok(self) -> bool:
        return not self.crashes and not self.hangs

    def report(self) -> str:
        rate = self.runs / self.seconds if self.seconds else 0.0
        lines = [
            f"{self.target.name}: {self.runs} inputs, {rate:,.0f} inputs/s inside the target, "
            f"{len(self.crashes)} distinct crashes, {len(self.hangs)} hangs over {self.max_ms:.0f} ms, "
            f"slowest {self.slowest_ms:.2f} ms ({len(self.slowest)} bytes, {self.slowest[:60]!r})"
        ]
        for crash in self.crashes.values():
            lines.append(f"  CRASH {crash.signature} x{crash.count}: {crash.data[:200]!r}")
            lines.append("    " + crash.trace.strip().splitlines()[-1])
        for ms, data in self.hangs[:5]:
            lines.append(f"  HANG {ms:.1f} ms: {data[:200]!r}")
        return "\n".join(lines)

    def save(self, folder: Path) -> list[Path]:
        """Write every crash and hang input to ``folder`` (crash-<signature>-<sha1>, hang-<sha1>)."""
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for crash in self.crashes.values():
            sig = crash.signature.replace(":", "_").replace("@", "-")
            path = folder / f"crash-{sig}-{hashlib.sha1(crash.data).hexdigest()[:12]}"
            path.write_bytes(crash.data)
            path.with_suffix(".txt").write_text(crash.trace)
            out.append(path)
        for _ms, data in self.hangs:
            path = folder / f"hang-{hashlib.sha1(data).hexdigest()[:12]}"
            path.write_bytes(data)
            out.append(path)
        return out


def dictionary() -> list[bytes]:
    """The tokens of tests/fuzz/sip.dict (libFuzzer's format: one "quoted" token a line)."""
    out = []
    for line in DICT.read_text().splitlines():
        line = line.strip()
        if line.startswith('"') and line.endswith('"'):
            out.append(line[1:-1].encode().decode("unicode_escape").encode("latin-1"))
    return out


# Long runs of one filler: what makes a backtracking regex or a repeated concatenation show its quadratic
# cost (coverage cannot see it, and libFuzzer's own mutations insert at most 128 repeated bytes).
_RUN_FILLERS = [
    b" ",
    b"\t",
    b" \t",
    b"a",
    b"a ",
    b";",
    b"; ",
    b",",
    b"<",
    b'"',
    b"%",
    b"=",
    b"\r\n ",
    b"\n",
    b"[",
    b"0",
]
_RUN_LENGTHS = (500, 2000, 8000, 30000)


def insert_run(data: bytes, rng: random.Random, max_size: int = 70000) -> bytes:
    """``data`` with a long run of one filler inserted at a random place (at most ``max_size`` bytes)."""
    filler = rng.choice(_RUN_FILLERS)
    count = max(1, min(rng.choice(_RUN_LENGTHS), max_size - len(data)) // len(filler))
    pos = rng.randint(0, len(data))
    return (data[:pos] + filler * count + data[pos:])[:max_size]


_INTERESTING = b'\r\n\t :;,<>"@[]%=?/\\\x00\xff0-19'
_NUMBERS = [b"0", b"-1", b"65535", b"65536", b"4294967296", b"99999999999999999999", b"1e9", b"nan", b"0x10"]


class Mutator:
    """A seeded byte mutator in the spirit of libFuzzer's: flips, interesting bytes, dictionary tokens,
    numbers, chunk insert/erase/duplicate, cross-over with another seed. Deterministic for a seed."""

    def __init__(
        self, seeds: list[bytes], seed: int = 0, tokens: list[bytes] | None = None, max_len: int = 65536
    ) -> None:
        self.max_len = max_len
        self.seeds = seeds or [b""]
        self.rng = random.Random(seed)
        self.tokens = tokens if tokens is not None else dictionary()

    def next(self) -> bytes:
        rng = self.rng
        data = bytearray(rng.choice(self.seeds))
        for _ in range(rng.choice((1, 1, 2, 3, 4, 8))):
            self._mutate(data)
        if rng.randrange(16) == 0:
            return insert_run(bytes(data), rng, self.max_len)
        return bytes(data[: self.max_len])

    def _mutate(self, data: bytearray) -> None:
        rng = self.rng
        pos = rng.randint(0, len(data))
        kind = rng.randrange(10)
        if kind == 0 and data:
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and data:
            data[min(pos, len(data) - 1)] = rng.choice(_INTERESTING)
        elif kind == 2 and self.tokens:
            data[pos:pos] = rng.choice(self.tokens)
        elif kind == 3:
            data[pos:pos] = rng.choice(_NUMBERS)
        elif kind == 4 and data:
            end = min(len(data), pos + rng.choice((1, 2, 4, 16, 64)))
            del data[pos:end]
        elif kind == 5 and data:
            start = rng.randrange(len(data))
            chunk = data[start : start + rng.choice((1, 8, 64, 512))]
            data[pos:pos] = chunk * rng.choice((1, 2, 16))
        elif kind == 6:
            other = rng.choice(self.seeds)
            if other:
                start = rng.randrange(len(other))
                data[pos:] = other[start:]
        elif kind == 7 and data:  # replace a run of digits by another number
            i = min(pos, len(data) - 1)
            while i < len(data) and not 48 <= data[i] <= 57:
                i += 1
            j = i
            while j < len(data) and 48 <= data[j] <= 57:
                j += 1
            data[i:j] = rng.choice(_NUMBERS)
        elif kind == 8:
            del data[pos:]
        elif data:
            i = min(pos, len(data) - 1)
            data[i] = rng.randrange(256)


def short_run(name: str, mutations: int, seed: int = 0, max_ms: float = MAX_MS) -> Judge:
    """The corpus of ``name``, then ``mutations`` seeded mutations of it (tests/fuzz/test_fuzz.py)."""
    judge = Judge(load(name), max_ms)
    seeds = corpus(name)
    for data in seeds:
        judge(data)
    mutator = Mutator(seeds, seed, max_len=judge.target.max_len)
    for _ in range(mutations):
        judge(mutator.next())
    return judge
