"""Compare the asyncio etcd clients etcd3aio and aetcd on what the registrar needs (docs/architecture.md).

The two cannot be imported in one process (duplicate proto symbols), so each runs in its own venv (from the
repository's root)::

    python3 -m venv /tmp/v-etcd3aio && /tmp/v-etcd3aio/bin/pip install etcd3aio==0.3.0 pytest
    python3 -m venv /tmp/v-aetcd && /tmp/v-aetcd/bin/pip install aetcd==1.0.0 pytest
    /tmp/v-etcd3aio/bin/python -m bench.etcd_client_compare etcd3aio
    /tmp/v-aetcd/bin/python -m bench.etcd_client_compare aetcd

Each run starts its own etcd (tests/support/etcd.py) and prints one JSON line per measurement. It uses each
library's own API (no wrapper), since what is compared is what the library gives.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tests.support.etcd import EtcdServer, running_etcd

VALUE = b"x" * 300  # about a binding's JSON
CONCURRENCY = 32


def emit(client: str, what: str, **data: Any) -> None:
    print(json.dumps({"client": client, "what": what, **data}), flush=True)


async def pipelined(n: int, op: Callable[[int], Awaitable[object]]) -> float:
    """Ops per second with CONCURRENCY requests in flight (how a writer task batches)."""
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with sem:
            await op(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0)


async def sequential(n: int, op: Callable[[int], Awaitable[object]]) -> tuple[float, float]:
    """(ops/s, CPU µs per op) one at a time: the CPU cost per RPC shows here."""
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        await op(i)
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6


class Adapter:
    name = ""

    async def connect(self, server: EtcdServer) -> None: ...
    async def close(self) -> None: ...
    async def grant(self, ttl: int) -> int: ...
    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int: ...
    async def prefix(self, prefix: bytes) -> int: ...
    async def txn_mod(self, key: bytes, mod: int, value: bytes) -> int: ...
    async def revision(self) -> int: ...
    async def compact(self, revision: int) -> None: ...
    def watch(self, prefix: bytes, start: int) -> Any: ...


class Etcd3aio(Adapter):
    name = "etcd3aio"

    async def connect(self, server: EtcdServer) -> None:
        from etcd3aio import Etcd3Client

        self.c = Etcd3Client([server.endpoint])
        await self.c.connect()

    async def close(self) -> None:
        await self.c.close()

    async def grant(self, ttl: int) -> int:
        return int((await self.c.lease.grant(ttl)).ID)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        return int((await self.c.kv.put(key, value, lease=lease)).header.revision)

    async def prefix(self, prefix: bytes) -> int:
        from etcd3aio import prefix_range_end

        resp = await self.c.kv.get(prefix, range_end=prefix_range_end(prefix))
        return sum(len(kv.value) + kv.mod_revision * 0 for kv in resp.kvs) // len(VALUE)

    async def txn_mod(self, key: bytes, mod: int, value: bytes) -> int:
        from etcd3aio._protobuf import Compare

        cmp = Compare(result=Compare.EQUAL, target=Compare.MOD, key=key, mod_revision=mod)
        resp = await self.c.kv.txn([cmp], [self.c.kv.txn_op_put(key, value)])
        return int(resp.header.revision) if resp.succeeded else 0

    async def revision(self) -> int:
        return int((await self.c.kv.get(b"\0")).header.revision)

    async def compact(self, revision: int) -> None:
        await self.c.kv.compact(revision, physical=True)

    async def watch(self, prefix: bytes, start: int) -> Any:
        from etcd3aio import prefix_range_end

        async for resp in self.c.watch.watch(
            prefix, prefix_range_end(prefix), start_revision=start, prev_kv=True
        ):
            if resp.compact_revision:
                yield ("compacted", resp.compact_revision)
            for ev in resp.events:
                yield ("event", ev.kv.mod_revision)


class Aetcd(Adapter):
    name = "aetcd"

    async def connect(self, server: EtcdServer) -> None:
        import aetcd

        self.c = aetcd.Client("127.0.0.1", server.client_port)
        await self.c.connect()

    async def close(self) -> None:
        await self.c.close()

    async def grant(self, ttl: int) -> int:
        return int((await self.c.lease(ttl)).id)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        return int((await self.c.put(key, value, lease=lease or None)).header.revision)

    async def prefix(self, prefix: bytes) -> int:
        resp = await self.c.get_prefix(prefix)
        return sum(len(kv.value) + kv.mod_revision * 0 for kv in resp) // len(VALUE)

    async def txn_mod(self, key: bytes, mod: int, value: bytes) -> int:
        t = self.c.transactions
        ok, res = await self.c.transaction(
            compare=[t.mod(key) == mod], success=[t.put(key, value), t.get(key)], failure=[]
        )
        return int(res[1][0][1].mod_revision) if ok else 0

    async def revision(self) -> int:
        return int((await self.c.get_prefix(b"\0")).header.revision)

    async def compact(self, revision: int) -> None:
        await self.c.compact(revision, physical=True)

    async def watch(self, prefix: bytes, start: int) -> Any:
        import aetcd

        try:
            async for ev in await self.c.watch_prefix(prefix, start_revision=start, prev_kv=True):
                yield ("event", ev.kv.mod_revision)
        except aetcd.exceptions.RevisionCompactedError as exc:
            yield ("compacted", exc.compacted_revision)


async def collect(gen: Any, sink: list[tuple[str, int]]) -> None:
    try:
        async for item in gen:
            sink.append(item)
    except Exception as exc:  # what the library raises is part of the result
        sink.append(("error:" + type(exc).__name__, 0))


async def wait_len(sink: list[tuple[str, int]], n: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len([s for s in sink if s[0] == "event"]) >= n:
            return True
        await asyncio.sleep(0.05)
    return False


async def run(a: Adapter, server: EtcdServer) -> None:
    await a.connect(server)
    name = a.name
    # ≤ 1,000 keys per lease, as LeasePool does: etcd 3.5's put cost grows with the keys already on a lease
    leases = [await a.grant(600) for _ in range(20)]
    rates = [
        await pipelined(10_000, lambda i: a.put(b"/b/put/%d" % (i % 5000), VALUE, leases[i % 5000 // 1000]))
        for _ in range(3)
    ]
    emit(
        name,
        "put_with_lease_pipelined_per_s",
        median=round(statistics.median(rates)),
        runs=[round(r) for r in rates],
    )
    seq = [
        await sequential(2000, lambda i: a.put(b"/b/seq/%d" % i, VALUE, leases[10 + i // 1000]))
        for _ in range(3)
    ]
    emit(
        name,
        "put_with_lease_sequential",
        per_s=round(statistics.median(s[0] for s in seq)),
        cpu_us=round(statistics.median(s[1] for s in seq)),
    )
    await pipelined(10_000, lambda i: a.put(b"/b/r10k/%05d" % i, VALUE))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        n = await a.prefix(b"/b/r10k/")
        times.append(time.perf_counter() - t0)
    emit(name, "prefix_range_10k_ms", median=round(statistics.median(times) * 1000, 1), keys=n)

    async def worker(k: int, n: int) -> None:
        key = b"/b/txn/%d" % k
        rev = await a.put(key, VALUE)
        for _ in range(n):
            new = await a.txn_mod(key, rev, VALUE)
            assert new, "txn compare failed"
            rev = new

    tx_rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k, 300) for k in range(CONCURRENCY)))
        tx_rates.append(300 * CONCURRENCY / (time.perf_counter() - t0))
    emit(name, "txn_mod_revision_pipelined_per_s", median=round(statistics.median(tx_rates)))

    # a conflicting txn must fail
    emit(name, "txn_conflict_fails", ok=not await a.txn_mod(b"/b/txn/0", 1, VALUE))

    # watch resume after restart
    start = await a.revision() + 1
    sink: list[tuple[str, int]] = []
    task = asyncio.create_task(collect(a.watch(b"/b/w/", start), sink))
    for i in range(100):
        await a.put(b"/b/w/%d" % i, VALUE)
    got_before = await wait_len(sink, 100, 5)
    await asyncio.to_thread(server.restart)
    written_after = 0
    t0 = time.monotonic()
    while written_after < 100 and time.monotonic() - t0 < 15:
        try:
            await a.put(b"/b/w/after/%d" % written_after, VALUE)
            written_after += 1
        except Exception:
            await asyncio.sleep(0.1)
    ok = await wait_len(sink, 200, 10)
    evs = [r for k, r in sink if k == "event"]
    emit(
        name,
        "watch_resume_after_restart",
        before=got_before,
        events=len(evs),
        expected=200,
        no_gap_no_dup=ok and len(evs) == len(set(evs)) == 200,
        errors=[k for k, _ in sink if k.startswith("error")],
        watch_alive=not task.done(),
    )
    task.cancel()

    # compaction: start a watch from a compacted revision
    old = await a.revision()
    for i in range(50):
        await a.put(b"/b/c/%d" % i, VALUE)
    await a.compact(await a.revision())
    sink2: list[tuple[str, int]] = []
    try:
        task2 = asyncio.create_task(collect(a.watch(b"/b/c/", old), sink2))
        await asyncio.sleep(2)
        await a.put(b"/b/c/new", VALUE)
        await asyncio.sleep(1)
        emit(name, "watch_from_compacted", seen=sink2[:3], watch_alive=not task2.done())
        task2.cancel()
    except Exception as exc:
        emit(name, "watch_from_compacted", raised=type(exc).__name__)
    await a.close()


def main() -> None:
    adapter: Adapter = {"etcd3aio": Etcd3aio, "aetcd": Aetcd}[sys.argv[1]]()
    with running_etcd() as server:
        asyncio.run(run(adapter, server))


if __name__ == "__main__":
    main()
