"""SIP over TLS against UDP on the same machine, from the repository's root:

    python -m bench.tls_bench [--phones 10000] [--active 1000] [--seconds 10] [--handshakes 2000]

One `midregistrar run --mode contact --store memory` process per run (UDP and TLS sockets, a certificate made
by the bench), Kamailio as the main registrar (UDP, no authentication), phones from this process (asyncio):

- memory: PHONES phones register, over UDP (one socket, one binding each) in one run and each over a TLS
  connection of its own in the other; the registrar's RSS after minus before, per phone, and the difference:
  what an idle TLS connection costs beyond its binding (goal ≤ 10 KB); and each over a secure WebSocket
  (WSS, RFC 7118) of its own, as WebRTC clients;
- absorbed refreshes: ACTIVE of those phones refresh in a closed loop (next REGISTER when the answer came)
  for SECONDS, over their persistent connections or over UDP: REGISTERs answered per second and the
  registrar's CPU per REGISTER (utime+stime from /proc). The phones share the two cores with the registrar,
  so the rate is the pair's, and the CPU per REGISTER is the figure to compare;
- new connections: HANDSHAKES TLS connections opened, handshaken and closed, 50 at a time: per second, and
  the registrar's CPU per handshake.

Prints a markdown table and the exact command.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shlex
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.support.kamailio import KamailioMain
from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.process import cpu_seconds
from tests.support.registrar import Registrar

HOST = "127.0.0.1"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def register(user: str, local: tuple[str, int], transport: str, cseq: int, branch: str) -> bytes:
    param = {"TLS": ";transport=tls", "WSS": ";transport=ws"}.get(transport, "")
    contact = f"<sip:{user}@{local[0]}:{local[1]}{param}>"
    return (
        f"REGISTER sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {local[0]}:{local[1]};rport;branch=z9hG4bK-{branch}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{user}@example.com>;tag={user}\r\nTo: <sip:{user}@example.com>\r\n"
        f"Call-ID: {user}@bench\r\nCSeq: {cseq} REGISTER\r\nContact: {contact};expires=600\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


@dataclass
class TlsPhone:
    user: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    transport: str = "TLS"
    cseq: int = 0

    async def register(self) -> int:
        self.cseq += 1
        local = self.writer.get_extra_info("sockname")[:2]
        self.writer.write(register(self.user, local, self.transport, self.cseq, f"{self.user}-{self.cseq}"))
        while True:
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status >= 200:
                return status


class UdpPhones(asyncio.DatagramProtocol):
    """Many phones on one UDP socket; answers matched by Call-ID."""

    def __init__(self) -> None:
        self.waiting: dict[bytes, asyncio.Future[int]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # A thousand answers in flight at once overflow the kernel's default receive buffer.
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        status = int(data.split(b" ", 2)[1])
        if status < 200:
            return
        start = data.find(b"\r\nCall-ID: ") + 11
        call_id = data[start : data.find(b"\r\n", start)]
        fut = self.waiting.pop(call_id, None)
        if fut is not None and not fut.done():
            fut.set_result(status)

    async def register(self, user: str, cseq: int, dest: tuple[str, int]) -> int:
        assert self.transport is not None
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting[f"{user}@bench".encode()] = fut
        local = self.transport.get_extra_info("sockname")[:2]
        self.transport.sendto(register(user, local, "UDP", cseq, f"{user}-{cseq}"), dest)
        return await asyncio.wait_for(fut, 8)


@dataclass
class Run:
    rss_per_phone_kb: float
    rate: float
    cpu_us: float
    handshakes_per_s: float = 0.0
    handshake_cpu_us: float = 0.0


async def gather_limited(coros: list, limit: int) -> list:  # type: ignore[type-arg]
    sem = asyncio.Semaphore(limit)

    async def one(c):  # type: ignore[no-untyped-def]
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


async def run_stream(reg: Registrar, ctx: ssl.SSLContext | None, args: argparse.Namespace) -> Run:
    """Phones on connections of their own: TLS with ``ctx``, plain TCP without."""
    pid = reg.pid
    before = rss_kb(pid)
    host = HOST if ctx else None

    async def open_phone(i: int) -> TlsPhone:
        reader, writer = await asyncio.open_connection(HOST, reg.port, ssl=ctx, server_hostname=host)
        phone = TlsPhone(f"t{i:05d}", reader, writer, "TLS" if ctx else "TCP")
        assert await phone.register() == 200
        return phone

    phones = await gather_limited([open_phone(i) for i in range(args.phones)], 100)
    await asyncio.sleep(2)
    per_phone = (rss_kb(pid) - before) / args.phones
    active = phones[: args.active]
    rate, cpu_us = await closed_loop(pid, [p.register for p in active], args.seconds)
    if ctx is None:
        for p in phones:
            p.writer.close()
        return Run(per_phone, rate, cpu_us)
    t0, c0 = time.monotonic(), cpu_seconds(pid)

    async def handshake(_: int) -> None:
        _, writer = await asyncio.open_connection(HOST, reg.port, ssl=ctx, server_hostname=HOST)
        writer.close()
        await writer.wait_closed()

    await gather_limited([handshake(i) for i in range(args.handshakes)], 50)
    took, cpu = time.monotonic() - t0, cpu_seconds(pid) - c0
    for p in phones:
        p.writer.close()
    return Run(per_phone, rate, cpu_us, args.handshakes / took, cpu / args.handshakes * 1e6)


@dataclass
class WssPhone:
    """A browser-like phone: one secure WebSocket of its own, subprotocol sip, a .invalid host in Via."""

    user: str
    ws: aiohttp.ClientWebSocketResponse
    cseq: int = 0

    async def register(self) -> int:
        self.cseq += 1
        local = (f"{self.user}.invalid", 443)
        await self.ws.send_str(
            register(self.user, local, "WSS", self.cseq, f"{self.user}-{self.cseq}").decode()
        )
        while True:
            msg = await self.ws.receive()
            status = int(msg.data.split(" ", 2)[1])
            if status >= 200:
                return status


async def run_wss(reg: Registrar, ctx: ssl.SSLContext, port: int, args: argparse.Namespace) -> Run:
    """Phones each on a secure WebSocket of its own (RFC 7118), as WebRTC clients are."""
    pid = reg.pid
    before = rss_kb(pid)
    connector = aiohttp.TCPConnector(limit=0, ssl=ctx)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def open_phone(i: int) -> WssPhone:
            ws = await session.ws_connect(f"wss://{HOST}:{port}/", protocols=("sip",), heartbeat=None)
            phone = WssPhone(f"w{i:05d}", ws)
            assert await phone.register() == 200
            return phone

        phones = await gather_limited([open_phone(i) for i in range(args.phones)], 100)
        await asyncio.sleep(2)
        per_phone = (rss_kb(pid) - before) / args.phones
        rate, cpu_us = await closed_loop(pid, [p.register for p in phones[: args.active]], args.seconds)
        await asyncio.gather(*(p.ws.close() for p in phones))
    return Run(per_phone, rate, cpu_us)


async def run_udp(reg: Registrar, args: argparse.Namespace) -> Run:
    pid = reg.pid
    loop = asyncio.get_running_loop()
    before = rss_kb(pid)
    _, proto = await loop.create_datagram_endpoint(UdpPhones, local_addr=(HOST, 0))
    dest = (HOST, reg.port)
    users = [f"u{i:05d}" for i in range(args.phones)]
    cseqs = dict.fromkeys(users, 1)
    statuses = await gather_limited([proto.register(u, 1, dest) for u in users], 100)
    assert all(s == 200 for s in statuses), set(statuses)
    await asyncio.sleep(2)
    per_phone = (rss_kb(pid) - before) / args.phones

    def refresher(user: str):  # type: ignore[no-untyped-def]
        async def go() -> int:
            cseqs[user] += 1
            return await proto.register(user, cseqs[user], dest)

        return go

    rate, cpu_us = await closed_loop(pid, [refresher(u) for u in users[: args.active]], args.seconds)
    return Run(per_phone, rate, cpu_us)


async def closed_loop(pid: int, phones: list, seconds: float) -> tuple[float, float]:  # type: ignore[type-arg]
    """Every phone refreshes again as soon as it is answered, for `seconds`: (answers/s, CPU µs each)."""
    done = 0
    stop = time.monotonic() + seconds

    async def loop(refresh) -> None:  # type: ignore[no-untyped-def]
        nonlocal done
        while time.monotonic() < stop:
            assert await refresh() == 200
            done += 1

    t0, c0 = time.monotonic(), cpu_seconds(pid)
    await asyncio.gather(*(loop(p) for p in phones))
    took, cpu = time.monotonic() - t0, cpu_seconds(pid) - c0
    return done / took, cpu / done * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phones", type=int, default=10000)
    ap.add_argument("--active", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--handshakes", type=int, default=2000)
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the registrar inherits it
    work = Path(tempfile.mkdtemp(prefix="tls-bench-"))
    pki = Pki(work / "pki")
    crt, key = pki.sign("registrar", "/CN=midregistrar", san=f"IP:{HOST}", server=True)
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    results: dict[str, Run] = {}
    for name in ("udp", "tcp", "tls", "wss"):
        kam = KamailioMain(work / f"kam-{name}", auth=False, quiet=True).start()
        port, wss_port = free_port(), free_port()
        reg = Registrar(
            (HOST, kam.port),
            mode="contact",
            port=port,
            transports={"tcp": ("udp", "tcp"), "tls": ("udp", "tls")}.get(name, ("udp",)),
            extra=["--tls-cert", str(crt), "--tls-key", str(key), "--outgoing-expires", "3600",
                   "--log-level", "warning", "--max-connections", "0", "--max-connections-per-source", "0",
                   *(["--listen", f"wss:{HOST}:{wss_port}"] if name == "wss" else [])],
            workdir=work / f"mid-{name}",
        ).start()  # fmt: skip
        try:
            if name == "udp":
                coro = run_udp(reg, args)
            elif name == "wss":
                coro = run_wss(reg, ctx, wss_port, args)
            else:
                coro = run_stream(reg, ctx if name == "tls" else None, args)
            results[name] = asyncio.run(coro)
        finally:
            reg.stop()
            kam.stop()
    udp, tcp, tls, wss = results["udp"], results["tcp"], results["tls"], results["wss"]
    runs = (udp, tcp, tls, wss)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {args.phones} phones, {args.active} refreshing\n")
    print("| | UDP | TCP (persistent) | TLS (persistent) | WSS (persistent) |\n|---|---|---|---|---|")
    row = "| {} | {} | {} | {} | {} |"
    print(row.format("registrar RSS per registered phone", *(f"{r.rss_per_phone_kb:.2f} KB" for r in runs)))
    print(
        row.format(
            "of which its connection",
            "",
            *(f"{r.rss_per_phone_kb - udp.rss_per_phone_kb:.2f} KB" for r in (tcp, tls, wss)),
        )
    )
    print(
        row.format("absorbed refreshes answered per second (closed loop)", *(f"{r.rate:.0f}" for r in runs))
    )
    print(row.format("registrar CPU per absorbed refresh", *(f"{r.cpu_us:.1f} µs" for r in runs)))
    print(
        row.format(
            "new TLS connections per second (handshake, close)", "", "", f"{tls.handshakes_per_s:.0f}", ""
        )
    )
    print(
        row.format("registrar CPU per TLS handshake (RSA 2048)", "", "", f"{tls.handshake_cpu_us:.0f} µs", "")
    )
    print(f"\ncommand: python -m bench.tls_bench {shlex.join(sys.argv[1:])}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
