"""Run a fuzz target: ``python -m tests.fuzz.run TARGET|all [--runs N] [--seconds S] [--engine atheris|mutate]``.

- ``--engine atheris`` (the default when atheris is installed): libFuzzer, coverage-guided (plus one mutation
  of ours, 1 in 20: a long run of one filler, for quadratic-time bugs coverage cannot see), over the
  ``registrar`` code (and PyYAML's, for ``config``), instrumented at import. New inputs go to
  ``--work/<target>/corpus`` (not the repository); the committed seeds are read from tests/fuzz/corpus/<target>.
  Every crash is recorded and the run goes on (one reproducer per distinct crash, in ``--work/<target>``).
- ``--engine mutate``: the seeded mutator of tests/fuzz/harness.py, no native code (what ``make test`` runs).
- ``--replay PATH...``: run the given inputs (a crash file, a corpus folder) once each and report.
- ``--merge``: minimise ``--work/<target>/corpus`` into tests/fuzz/corpus/<target> (libFuzzer -merge=1:
  only inputs that add coverage are copied).

Reports inputs/s, crashes, hangs (one input over ``--max-ms``, 100 ms, on its best of three runs) and the
slowest input; exits 1 when there was a crash or a hang. ``all`` runs every target in a child process each.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from tests.fuzz.harness import CORPUS, DICT, MAX_MS, NAMES, Judge, Mutator, corpus, insert_run, load

WORK = Path(os.environ.get("MIDREG_FUZZ_WORK", ".cache/fuzz"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=[*NAMES, "all"])
    p.add_argument("--runs", type=int, default=0, help="inputs to run (0: no limit; stop on --seconds)")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: no limit)")
    p.add_argument("--engine", choices=["atheris", "mutate"], default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-ms", type=float, default=MAX_MS)
    p.add_argument("--work", type=Path, default=WORK, help="new corpus inputs and crash reproducers")
    p.add_argument("--replay", nargs="*", type=Path, help="run these files (or folders) once each")
    p.add_argument("--merge", action="store_true", help="minimise the work corpus into the committed one")
    p.add_argument(
        "--libfuzzer", nargs=argparse.REMAINDER, help=argparse.SUPPRESS
    )  # (merge's child processes)
    return p


def _finish(judge: Judge, work: Path, started: float, *, instrumented: bool = False) -> int:
    wall = time.monotonic() - started
    print(judge.report() + f"\n  wall {wall:.1f} s, {judge.runs / wall if wall else 0:,.0f} inputs/s overall")
    saved = judge.save(work)
    for path in saved:
        print(f"  saved {path}")
    sys.stdout.flush()
    failed = bool(judge.crashes)
    if judge.hangs and instrumented:
        # Coverage instrumentation makes every input several times slower: a hang counts only when the input
        # is still over the limit without it (timed again in a fresh process).
        hangs = [str(p) for p in saved if p.name.startswith("hang-")]
        replay = [sys.executable, "-m", "tests.fuzz.run", judge.target.name, "--max-ms", str(judge.max_ms)]
        rc = subprocess.call([*replay, "--replay", *hangs])
        print(
            f"  {len(hangs)} slow inputs timed again without instrumentation: {'HANGS' if rc else 'no hang'}"
        )
        return 1 if rc or failed else 0
    return 0 if judge.ok else 1


def _replay(name: str, paths: list[Path], max_ms: float) -> int:
    judge = Judge(load(name), max_ms)
    started = time.monotonic()
    for path in paths:
        for f in sorted(path.iterdir()) if path.is_dir() else [path]:
            if f.is_file() and f.suffix != ".txt" and judge(f.read_bytes()) is not None:
                print(f"crash: {f}")
    return _finish(judge, Path(".cache/fuzz/replay"), started)


def _mutate(name: str, args: argparse.Namespace) -> int:
    judge = Judge(load(name), args.max_ms)
    seeds = corpus(name)
    started = time.monotonic()
    for data in seeds:
        judge(data)
    mutator = Mutator(seeds, args.seed, max_len=judge.target.max_len)
    while (not args.runs or judge.runs < args.runs) and (
        not args.seconds or time.monotonic() - started < args.seconds
    ):
        judge(mutator.next())
    return _finish(judge, args.work / name, started)


def _atheris(name: str, args: argparse.Namespace) -> int:
    import atheris  # type: ignore[import-untyped]

    with atheris.instrument_imports(include=["registrar", "yaml", "tests.fuzz", "tests.unit"]):
        target = load(name)
    judge = Judge(target, args.max_ms, retries=0)
    work = args.work / name
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.seconds if args.seconds else None
    last_report = [started]

    def one(data: bytes) -> None:
        judge(data)
        now = time.monotonic()
        if now - last_report[0] > 60:
            last_report[0] = now
            print(judge.report().splitlines()[0], flush=True)
        if (args.runs and judge.runs >= args.runs) or (deadline is not None and now >= deadline):
            os._exit(_finish(judge, work, started, instrumented=True))

    libfuzzer = [
        sys.argv[0],
        f"-seed={args.seed}",
        f"-dict={DICT}",
        f"-max_len={target.max_len}",  # (long runs of blanks: tests/fuzz/harness.py insert_run)
        "-timeout=10",
        "-rss_limit_mb=4096",
        "-print_final_stats=0",
        f"-artifact_prefix={work}/",  # (an input over -timeout ends the run: libFuzzer writes it there)
        str(work / "corpus"),
        str(CORPUS / name),
    ]
    if args.merge or args.libfuzzer is not None:
        # libFuzzer's merge runs its argv[0] again in child processes: a script that comes back here.
        launcher = work / "libfuzzer.sh"
        launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m tests.fuzz.run {name} --libfuzzer "$@"\n')
        launcher.chmod(0o755)
        if args.libfuzzer is not None:
            libfuzzer = [str(launcher), *args.libfuzzer]
        else:
            libfuzzer = [str(launcher), "-merge=1", str(CORPUS / name), str(work / "corpus")]

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.randrange(20) == 0:
            return insert_run(data, rng, max_size)
        out: bytes = atheris.Mutate(data, max_size)
        return out

    atheris.Setup(libfuzzer, one, custom_mutator=mutate)
    atheris.Fuzz()
    return _finish(judge, work, started, instrumented=True)  # (not reached: libFuzzer exits, or one() does)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = NAMES if args.target == "all" else (args.target,)
    if len(names) > 1:
        failed = 0
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "all"]
        for name in names:
            print(f"== {name}", flush=True)
            rc = subprocess.call([sys.executable, "-m", "tests.fuzz.run", name, *forwarded])
            failed |= rc != 0
        return 1 if failed else 0
    name = names[0]
    if args.libfuzzer is not None or args.merge:
        args.runs, args.seconds = 0, 0.0  # (libFuzzer decides when a merge is over)
    if args.replay is not None:
        return _replay(name, args.replay, args.max_ms)
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
        except ImportError:
            engine = "mutate"
        else:
            engine = "atheris"
    if engine == "mutate":
        return _mutate(name, args)
    return _atheris(name, args)


if __name__ == "__main__":
    sys.exit(main())
