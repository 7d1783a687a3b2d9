"""``midregistrar`` with its UDP shell timed from inside, for ``python -m bench.latency_probe --split``.

    MIDREG_BENCH_TIMINGS=out.json python -m bench.instrumented_cli run ...

Wraps ``SipServer.datagram``/``flush``/``fire_timers`` and hooks ``gc.callbacks``; at exit writes, per
datagram, the time from its read to the flush that sent its answer (what the process itself adds: parsing,
the core, the held answers), each timer run and each collection. What a client measures beyond that is time
spent in the socket's receive queue, waiting behind the datagrams read before it.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from registrar.cli import main
from registrar.net import server

clock = time.perf_counter
read_at: list[float] = []  # datagrams read whose answers have not been flushed yet
in_process: list[float] = []
timers: list[float] = []
collections: list[tuple[int, float]] = []
_gc_start = [0.0]

datagram, flush, fire_timers = server.SipServer.datagram, server.SipServer.flush, server.SipServer.fire_timers


def timed_datagram(self: server.SipServer, data: bytes, addr: tuple[str, int], index: int) -> None:
    read_at.append(clock())
    datagram(self, data, addr, index)


def timed_flush(self: server.SipServer) -> None:
    flush(self)
    now = clock()
    in_process.extend(now - t for t in read_at)
    read_at.clear()


def timed_fire_timers(self: server.SipServer) -> None:
    start = clock()
    fire_timers(self)
    timers.append(clock() - start)


def on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_start[0] = clock()
    else:
        collections.append((info["generation"], clock() - _gc_start[0]))


def dump() -> None:
    out = {"in_process": in_process, "timers": timers, "collections": collections}
    Path(os.environ["MIDREG_BENCH_TIMINGS"]).write_text(json.dumps(out))


server.SipServer.datagram = timed_datagram  # type: ignore[method-assign]
server.SipServer.flush = timed_flush  # type: ignore[method-assign]
server.SipServer.fire_timers = timed_fire_timers  # type: ignore[method-assign]
gc.callbacks.append(on_gc)
atexit.register(dump)

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
