"""etcd client layer benchmark: put-with-lease/s through LeasePool, CAS txn/s, live leases for N bindings.

    python -m bench.etcd_bench [--keys 100000] [--concurrency 64] [--bucket 5] [--max-keys 1000]

Starts its own etcd (tests/support/etcd.py: loopback, --unsafe-no-fsync, auto-compaction), so etcd and this
client share the machine's cores like in the integration tests. Prints a markdown table (medians of
``--runs``) headed by the command that produced it. CPU µs/op is this process's CPU per call: the
registrar's budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

from registrar.store.etcd_client import EtcdClient, LeasePool, mod_revision_is, op_put
from tests.support.etcd import running_etcd


async def timed(n: int, concurrency: int, op: Callable[[int], Awaitable[object]]) -> tuple[float, float]:
    """(ops/s, client CPU µs/op) with ``concurrency`` calls in flight."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await op(i)

    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6


def binding(i: int, expires_at: float) -> bytes:
    """About the size of a real binding record."""
    return json.dumps(
        {
            "v": 1,
            "ctid": 1000 + i,
            "contact": f"<sip:user{i}@192.0.2.{i % 250}:5060;transport=udp>",
            "expires_at": expires_at,
            "source": {"transport": "udp", "host": f"192.0.2.{i % 250}", "port": 5060},
            "call_id": f"{i:032x}@phone",
            "cseq": 42,
            "owner": "pod-0",
        }
    ).encode()


async def bench(endpoint: str, args: argparse.Namespace) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    async with EtcdClient([endpoint], timeout=10.0) as c:
        # put-with-lease through the pool: N bindings expiring over the next 5–10 minutes
        put_runs: list[tuple[float, float]] = []
        live_runs: list[int] = []
        for run in range(args.runs):
            pool = LeasePool(c, bucket=args.bucket, max_keys=args.max_keys)
            now = time.time()
            before = len(await c.leases())

            async def put(i: int, pool: LeasePool = pool, now: float = now, run: int = run) -> None:
                expires_at = now + 300 + (i * 7919 % 300)
                lease = await pool.lease_for(expires_at)
                await c.put(b"/bench/%d/aor/u%d/ct/%d" % (run, i, i), binding(i, expires_at), lease=lease)

            put_runs.append(await timed(args.keys, args.concurrency, put))
            live_runs.append(len(await c.leases()) - before)
            await pool.close(revoke=True)  # deletes the keys: the next run starts clean
        rows.append((f"put with lease (LeasePool), {args.concurrency} in flight", _rate(put_runs)))
        rows.append((f"live leases for {args.keys:,} bindings (5–10 min expiries)", _med_int(live_runs)))

        # CAS: each of `concurrency` writers owns one AoR key and rewrites it with mod_revision == last
        n_txn = max(args.keys // 10, args.concurrency * 10)
        per = n_txn // args.concurrency
        txn_runs: list[tuple[float, float]] = []
        for _ in range(args.runs):
            revs = {k: await c.put(b"/bench/txn/%d" % k, b"{}") for k in range(args.concurrency)}

            async def writer(k: int, revs: dict[int, int] = revs) -> None:
                key = b"/bench/txn/%d" % k
                for _ in range(per):
                    r = await c.txn([mod_revision_is(key, revs[k])], [op_put(key, binding(k, 0.0))])
                    assert r.succeeded
                    revs[k] = r.revision

            c0, t0 = time.process_time(), time.perf_counter()
            await asyncio.gather(*(writer(k) for k in range(args.concurrency)))
            total = per * args.concurrency
            txn_runs.append((total / (time.perf_counter() - t0), (time.process_time() - c0) / total * 1e6))
        rows.append((f"txn (compare mod_revision, put), {args.concurrency} in flight", _rate(txn_runs)))

        # sequential put: latency-bound, shows the per-call CPU without pipelining
        seq = [
            await timed(2000, 1, lambda i: c.put(b"/bench/seq/%d" % i, binding(i, 0.0)))
            for _ in range(args.runs)
        ]
        rows.append(("put, one at a time", _rate(seq)))

        # re-list: prefix read of 10,000 bindings in pages of 1,000
        await timed(10_000, args.concurrency, lambda i: c.put(b"/bench/list/%05d" % i, binding(i, 0.0)))
        list_runs = []
        for _ in range(max(3, args.runs)):
            t0 = time.perf_counter()
            n = sum([len(p.kvs) async for p in c.iter_prefix(b"/bench/list/", page_size=1000)])
            list_runs.append(time.perf_counter() - t0)
        assert n == 10_000
        rows.append(
            (
                "prefix read of 10,000 bindings (pages of 1,000)",
                f"{statistics.median(list_runs) * 1000:.0f} ms",
            )
        )
    return rows


def _rate(runs: list[tuple[float, float]]) -> str:
    rate = statistics.median(r for r, _ in runs)
    cpu = statistics.median(c for _, c in runs)
    return f"{rate:,.0f}/s ({cpu:.0f} µs CPU/op)"


def _med_int(values: list[int]) -> str:
    return f"{statistics.median(values):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--bucket", type=float, default=5.0)
    parser.add_argument("--max-keys", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with running_etcd() as server:
        rows = asyncio.run(bench(server.endpoint, args))
    command = " ".join(["python -m bench.etcd_bench", *sys.argv[1:]])
    print(f"`{command}` (etcd 3.5.1 --unsafe-no-fsync on loopback, {os.cpu_count()} cores shared, medians)\n")
    print("| measurement | result |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
