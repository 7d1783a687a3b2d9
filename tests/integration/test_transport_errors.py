"""A relayed REGISTER toward a TCP main registrar that cannot be reached gets 503 at once, through the real
asyncio shell: the registrar (``registrar.app.Registrar``, mode mirror, memory store) runs in this process on
loopback, the phone is a UDP socket and the main registrar a TCP port that refuses or drops connections."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from registrar.app import Registrar
from registrar.config import Settings
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

LOOP = "127.0.0.1"


def _register(phone_port: int, registrar_port: int) -> bytes:
    return (
        f"REGISTER sip:example.test SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {LOOP}:{phone_port};branch=z9hG4bK-te1;rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@example.test>;tag=p1\r\n"
        "To: <sip:alice@example.test>\r\n"
        "Call-ID: transport-error-1\r\n"
        "CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:alice@{LOOP}:{phone_port}>\r\n"
        "Expires: 600\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class _Phone(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.replies.put_nowait(data)


async def _register_through(main_port: int, host: str = LOOP) -> tuple[bytes, float]:
    """Start a mid-registrar whose main registrar is ``sip:<host>:<main_port>;transport=tcp``, send it a
    REGISTER from a UDP phone and return the first final reply and how long it took."""
    sip_port = free_port(LOOP)
    settings = Settings(
        listen=[f"udp:{LOOP}:{sip_port}", f"tcp:{LOOP}:{sip_port}"],
        main_registrar=f"sip:{host}:{main_port};transport=tcp",
        mode="mirror",
    )
    registrar = Registrar(settings)
    await registrar.start()
    loop = asyncio.get_running_loop()
    transport, phone = await loop.create_datagram_endpoint(_Phone, local_addr=(LOOP, 0))
    try:
        phone_port = transport.get_extra_info("sockname")[1]
        started = time.monotonic()
        transport.sendto(_register(phone_port, sip_port), (LOOP, sip_port))
        while True:  # skip provisional responses, if any
            reply = await asyncio.wait_for(phone.replies.get(), 5.0)
            if not reply.startswith(b"SIP/2.0 1"):
                return reply, time.monotonic() - started
    finally:
        transport.close()
        assert registrar.server is not None
        await registrar.server.close()


def test_refused_connection_to_the_main_registrar_gives_503_at_once() -> None:
    # A bound TCP socket that does not listen: every connection attempt to it is refused (RST).
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind((LOOP, 0))
    try:
        reply, took = asyncio.run(_register_through(closed.getsockname()[1]))
    finally:
        closed.close()
    assert reply.startswith(b"SIP/2.0 503 "), reply
    assert took < 0.5, f"503 took {took:.3f} s: the transaction waited instead of failing on the refusal"


def test_connection_dropped_before_the_answer_gives_503_at_once() -> None:
    async def main() -> tuple[bytes, float]:
        received = asyncio.Event()

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")  # the relayed REGISTER arrived
            received.set()
            writer.transport.abort()  # reset, no answer

        server = await asyncio.start_server(hang_up, LOOP, 0)
        try:
            reply = await _register_through(server.sockets[0].getsockname()[1])
        finally:
            server.close()
        assert received.is_set(), "the REGISTER never reached the main registrar"
        return reply

    reply, took = asyncio.run(main())
    assert reply.startswith(b"SIP/2.0 503 "), reply
    assert took < 0.5, f"503 took {took:.3f} s: the lost connection did not fail the transaction"


def test_a_main_registrar_named_by_dns_is_reached_over_tcp() -> None:
    """The connection opened toward a name is filed under that name: the relayed REGISTER waiting for it is
    written once it is up, and the answer comes back to the phone."""

    async def main() -> tuple[bytes, float]:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            keep = ("via:", "from:", "call-id:", "cseq:", "contact:")
            lines = [line for line in head.split("\r\n") if line.lower().startswith(keep)]
            to = next(line for line in head.split("\r\n") if line.lower().startswith("to:"))
            reply = ["SIP/2.0 200 OK", *lines, f"{to};tag=main1", "Content-Length: 0", "", ""]
            writer.write("\r\n".join(reply).encode())
            await writer.drain()

        server = await asyncio.start_server(answer, LOOP, 0)
        try:
            return await _register_through(server.sockets[0].getsockname()[1], host="localhost")
        finally:
            server.close()

    reply, took = asyncio.run(main())
    assert reply.startswith(b"SIP/2.0 200 "), reply
    assert took < 2.0
