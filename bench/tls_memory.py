"""Where the memory of an idle TLS server connection goes, from the repository's root:

    python -m bench.tls_memory [--connections 5000]

No registrar: a server process accepts the way registrar/net/server.py does (``sock_accept``, then
``connect_accepted_socket(..., ssl=...)``), one exchange per connection (600 bytes in, 400 out, like a
REGISTER and its 200), and holds the connections; this process opens them (100 at a time, after 200 opened
and closed to warm up) and reads the server's RSS and glibc heap (``mallinfo2``) before and after. Variants:
event loop (uvloop, asyncio), TLS 1.3 or 1.2, session tickets on or off, RSA 2048 or ECDSA P-256
certificate, OpenSSL's ``SSL_MODE_RELEASE_BUFFERS`` cleared (CPython sets it on every context), plain TCP.
Then OpenSSL alone: server-side ``ssl.SSLObject`` + two ``ssl.MemoryBIO`` after a handshake and one
exchange, in one process, heap in use per connection.

Prints a markdown table (KB per connection) and the exact command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import resource
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

HOST = "127.0.0.1"
SSL_CTRL_MODE = 33
SSL_CTRL_CLEAR_MODE = 78
SSL_MODE_RELEASE_BUFFERS = 0x10


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_kb() -> float:
    """Bytes glibc's malloc has handed out and not had back (heap and mmapped chunks), in KB."""
    info = _libc.mallinfo2()
    return float(info.uordblks + info.hblkhd) / 1024


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` of a CPython ``ssl.SSLContext``: the first field after the object header."""
    pointer = ctypes.c_void_p.from_address(id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    assert pointer
    return pointer


def _libssl() -> ctypes.CDLL:
    """The libssl the running ``_ssl`` module is linked with (found in this process's mappings)."""
    path = next(
        line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libssl.so" in line
    )
    lib = ctypes.CDLL(path)
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    return lib


def ssl_mode(ctx: ssl.SSLContext) -> int:
    return int(_libssl().SSL_CTX_ctrl(_ssl_ctx_pointer(ctx), SSL_CTRL_MODE, 0, None))


def server_context(pki: Path, cert: str, tls: str, tickets: bool, release: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki / f"{cert}.crt", pki / f"{cert}.key")
    if tls == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    if not release:
        _libssl().SSL_CTX_ctrl(_ssl_ctx_pointer(ctx), SSL_CTRL_CLEAR_MODE, SSL_MODE_RELEASE_BUFFERS, None)
        assert not ssl_mode(ctx) & SSL_MODE_RELEASE_BUFFERS
    return ctx


# ---------------------------------------------------------------------------------------- server side


class _Held(asyncio.Protocol):
    held: list[asyncio.BaseTransport] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.held.append(transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"x" * 400)  # type: ignore[attr-defined]


async def serve(ctx: ssl.SSLContext | None) -> None:
    """Accept like the registrar, then answer "m" lines on stdin with the process's memory (JSON)."""
    loop = asyncio.get_running_loop()
    sock = socket.create_server((HOST, 0), backlog=1024)
    sock.setblocking(False)
    print(sock.getsockname()[1], flush=True)
    tasks: set[asyncio.Task[object]] = set()

    async def accept() -> None:
        while True:
            conn, _ = await loop.sock_accept(sock)
            task = loop.create_task(
                loop.connect_accepted_socket(
                    _Held, conn, ssl=ctx, ssl_handshake_timeout=10.0 if ctx is not None else None
                )
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    accepting = loop.create_task(accept())
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while (await reader.readline()).strip():
        gc.collect()
        print(json.dumps({"rss": rss_kb(), "heap": heap_kb(), "held": len(_Held.held)}), flush=True)
    accepting.cancel()


# ---------------------------------------------------------------------------------------- client side


def measure(connections: int, server_args: list[str]) -> tuple[float, float]:
    """(RSS, heap in use) of the server process per connection held, in KB."""
    srv = subprocess.Popen(
        [sys.executable, "-m", "bench.tls_memory", "--serve", *server_args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert srv.stdin is not None and srv.stdout is not None
    stdin, stdout = srv.stdin, srv.stdout
    port = int(stdout.readline())

    def sample() -> dict[str, float]:
        stdin.write("m\n")
        stdin.flush()
        return dict(json.loads(stdout.readline()))

    client: ssl.SSLContext | None = None
    if "--plain" not in server_args:
        client = ssl.create_default_context()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE

    async def run() -> tuple[dict[str, float], dict[str, float]]:
        limit = asyncio.Semaphore(100)
        writers: list[asyncio.StreamWriter] = []

        async def one() -> None:
            async with limit:
                reader, writer = await asyncio.open_connection(HOST, port, ssl=client)
                writer.write(b"y" * 600)
                await reader.read(65536)
                writers.append(writer)

        await asyncio.gather(*(one() for _ in range(200)))
        for writer in writers:
            writer.close()
        writers.clear()
        await asyncio.sleep(1)
        before = sample()
        await asyncio.gather(*(one() for _ in range(connections)))
        await asyncio.sleep(2)
        after = sample()
        assert after["held"] - before["held"] == connections, (before, after)
        for writer in writers:
            writer.close()
        return before, after

    try:
        before, after = asyncio.run(run())
    finally:
        stdin.close()
        srv.wait(10)
    return (after["rss"] - before["rss"]) / connections, (after["heap"] - before["heap"]) / connections


def openssl_alone(pki: Path, connections: int, server_args: list[str]) -> None:
    """Print the heap in use per server-side SSLObject + its two MemoryBIOs (client sides freed)."""
    args = _server_parser().parse_args(server_args)
    server = server_context(pki, args.cert, args.tls, args.tickets == "on", args.release == "on")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE

    def pair() -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
        s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        srv = server.wrap_bio(s_in, s_out, server_side=True)
        cli = client.wrap_bio(c_in, c_out)
        for _ in range(10):
            done = 0
            for obj in (cli, srv):
                try:
                    obj.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if done == 2:
                break
        cli.write(b"y" * 600)
        s_in.write(c_out.read())
        srv.read(65536)
        srv.write(b"x" * 400)
        c_in.write(s_out.read())
        cli.read(65536)
        s_in.write(c_out.read())  # TLS 1.3: the client's answer to the tickets, if any
        with contextlib.suppress(ssl.SSLWantReadError):
            srv.read(65536)
        return srv, s_in, s_out

    kept = [pair() for _ in range(200)]
    kept.clear()
    gc.collect()
    heap0 = heap_kb()
    kept = [pair() for _ in range(connections)]
    gc.collect()
    print(json.dumps({"heap": (heap_kb() - heap0) / connections}), flush=True)


def _server_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--pki", type=Path)
    ap.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"))
    ap.add_argument("--cert", default="rsa", choices=("rsa", "ec"))
    ap.add_argument("--tls", default="1.3", choices=("1.3", "1.2"))
    ap.add_argument("--tickets", default="on", choices=("on", "off"))
    ap.add_argument("--release", default="on", choices=("on", "off"))
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--openssl-alone", type=int, default=0)
    return ap


def _serve_main(argv: list[str]) -> int:
    args = _server_parser().parse_args(argv)
    if args.openssl_alone:
        openssl_alone(args.pki, args.openssl_alone, argv)
        return 0
    ctx = (
        None
        if args.plain
        else server_context(args.pki, args.cert, args.tls, args.tickets == "on", args.release == "on")
    )
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(ctx))
    else:
        asyncio.run(serve(ctx))
    return 0


def make_pki(folder: Path) -> Path:
    for name, key in (
        ("rsa", ["-newkey", "rsa:2048"]),
        ("ec", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
    ):
        subprocess.run(
            ["openssl", "req", "-x509", *key, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", "/CN=midregistrar", "-addext", f"subjectAltName=IP:{HOST}"],
            cwd=folder, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    return folder


VARIANTS: list[tuple[str, list[str]]] = [
    ("TCP, no TLS (uvloop)", ["--plain"]),
    ("TLS 1.3, RSA 2048, tickets (uvloop: the registrar as it runs)", []),
    ("same, asyncio's own event loop", ["--loop", "asyncio"]),
    ("TLS 1.2", ["--tls", "1.2"]),
    ("TLS 1.3, no session tickets", ["--tickets", "off"]),
    ("TLS 1.3, ECDSA P-256", ["--cert", "ec"]),
    ("TLS 1.2, ECDSA P-256, no tickets", ["--tls", "1.2", "--cert", "ec", "--tickets", "off"]),
    ("TLS 1.3, SSL_MODE_RELEASE_BUFFERS cleared", ["--release", "off"]),
]


def main() -> int:
    if sys.argv[1:2] == ["--serve"]:
        return _serve_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=5000)
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it
    pki = make_pki(Path(tempfile.mkdtemp(prefix="tls-memory-")))
    print(f"\n{ssl.OPENSSL_VERSION}; SSL_MODE_RELEASE_BUFFERS set by CPython on a new context:", end=" ")
    print(bool(ssl_mode(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)) & SSL_MODE_RELEASE_BUFFERS))
    print(f"{args.connections} idle connections held by one server process, KB each\n")
    print("| | server RSS | malloc heap in use | OpenSSL alone (heap) |\n|---|---|---|---|")
    for label, extra in VARIANTS:
        server_args = ["--pki", str(pki), *extra]
        rss, heap = measure(args.connections, server_args)
        alone = ""
        if "--plain" not in extra and "asyncio" not in extra:
            out = subprocess.run(
                [sys.executable, "-m", "bench.tls_memory", "--serve", *server_args,
                 "--openssl-alone", str(args.connections)],
                check=True, capture_output=True, text=True, timeout=600,
            ).stdout  # fmt: skip
            alone = f"{json.loads(out)['heap']:.1f}"
        print(f"| {label} | {rss:.1f} | {heap:.1f} | {alone} |", flush=True)
    print(f"\ncommand: python -m bench.tls_memory {shlex.join(sys.argv[1:])}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
