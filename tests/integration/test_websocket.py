"""SIP over WebSocket (RFC 7118) with a real midregistrar process and Kamailio as the main registrar: a WebSocket
phone (aiohttp's client, subprotocol ``sip``, its host a ``.invalid`` name as browsers write it) registers over
``ws:`` and ``wss:``, its refreshes are absorbed over the same connection, and a call that Kamailio places to it
arrives over that connection and its answer goes back. A handshake without the ``sip`` subprotocol is refused."""

from __future__ import annotations

import asyncio
import socket
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from registrar.sip.message import Response, parse_message
from tests.support.kamailio import KamailioMain
from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.registrar import Registrar, metric
from tests.support.sip import in_dialog_request, sip_request, status_code

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
BROWSER_HOST = "df7jal23ls0d.invalid"  # what a WebRTC client writes in its Via and Contact


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Registrar, KamailioMain, Pki, int, int]]:
    pki = Pki(tmp_path / "pki")
    crt, key = pki.sign("registrar", "/CN=midregistrar", san=f"IP:{LOOPBACK}", server=True)
    kam = KamailioMain(tmp_path / "kam", auth=False).start()
    ws_port, wss_port = free_port(), free_port()
    reg = Registrar(
        (LOOPBACK, kam.port),
        mode="contact",
        transports=("udp",),
        extra=[
            "--listen", f"ws:{LOOPBACK}:{ws_port}", "--listen", f"wss:{LOOPBACK}:{wss_port}",
            "--tls-cert", str(crt), "--tls-key", str(key), "--outgoing-expires", "3600",
        ],
        workdir=tmp_path / "mid",
    ).start()  # fmt: skip
    yield reg, kam, pki, ws_port, wss_port
    reg.stop()
    kam.stop()


def register(user: str, cseq: int) -> str:
    uri = f"sip:{user}@example.com"
    return (
        f"REGISTER sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/WSS {BROWSER_HOST};branch=z9hG4bK-{uuid.uuid4().hex[:12]}\r\n"
        f"Max-Forwards: 70\r\nFrom: <{uri}>;tag=ws1\r\nTo: <{uri}>\r\nCall-ID: {user}-ws\r\n"
        f"CSeq: {cseq} REGISTER\r\nContact: <sip:{user}@{BROWSER_HOST};transport=ws>;expires=600\r\n"
        f"Content-Length: 0\r\n\r\n"
    )


async def final(ws: aiohttp.ClientWebSocketResponse) -> str:
    while True:
        msg = await asyncio.wait_for(ws.receive(), 8)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        code = status_code(msg.data.encode())
        if code is not None and code >= 200:
            return str(msg.data)


def answer(invite: str, status: int, reason: str, contact: str | None = None) -> str:
    """A response to ``invite``: its Via, From, Call-ID, CSeq and Record-Routes, a To tag (and a Contact)."""
    heads = invite.split("\r\n\r\n", 1)[0].split("\r\n")[1:]
    keep = [
        h for h in heads if h.split(":", 1)[0].lower() in ("via", "from", "call-id", "cseq", "record-route")
    ]
    to = next(h for h in heads if h.lower().startswith("to:"))
    more = [f"Contact: <{contact}>"] if contact else []
    return "\r\n".join(
        [f"SIP/2.0 {status} {reason}", *keep, f"{to};tag=ws-answer", *more, "Content-Length: 0", "", ""]
    )


def test_websocket_phones_register_refresh_and_receive_a_call(
    setup: tuple[Registrar, KamailioMain, Pki, int, int],
) -> None:
    reg, kam, pki, ws_port, wss_port = setup
    ctx = ssl.create_default_context(cafile=str(pki.ca))

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://{LOOPBACK}:{ws_port}/", protocols=("sip",))
            assert ws.protocol == "sip"
            wss = await session.ws_connect(f"wss://{LOOPBACK}:{wss_port}/sip", protocols=("sip",), ssl=ctx)
            for user, conn in (("alice", ws), ("bob", wss)):
                for cseq in range(1, 5):  # the first relayed, the next three absorbed
                    await conn.send_str(register(user, cseq))
                    assert status_code((await final(conn)).encode()) == 200
            m = reg.metrics()
            assert metric(m, "midregistrar_registers", outcome="relayed") == 2
            assert metric(m, "midregistrar_registers", outcome="absorbed") == 6
            assert {c.aor.split("@")[0] for c in kam.contacts()} == {"alice", "bob"}
            # A call from the main registrar's side reaches alice over her WebSocket; her answer goes back.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as caller:
                caller.bind((LOOPBACK, 0))
                invite = sip_request(
                    "INVITE", "sip:alice@example.com", caller.getsockname(), to_uri="sip:alice@example.com"
                )
                caller.sendto(invite, kam.addr)
                got = await asyncio.wait_for(ws.receive(), 8)
                assert got.type is aiohttp.WSMsgType.TEXT and got.data.startswith("INVITE "), got
                assert f"sip:alice@{BROWSER_HOST}" in got.data.split("\r\n", 1)[0]
                await ws.send_str(answer(got.data, 486, "Busy Here"))
                caller.settimeout(8)
                codes = []
                while 486 not in codes:
                    codes.append(status_code(caller.recvfrom(65535)[0]) or 0)
            await ws.close()
            await wss.close()

    asyncio.run(scenario())
    assert "Traceback" not in reg.log()


def test_a_handshake_without_the_sip_subprotocol_is_refused(
    setup: tuple[Registrar, KamailioMain, Pki, int, int],
) -> None:
    _, _, _, ws_port, _ = setup

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(f"ws://{LOOPBACK}:{ws_port}/", protocols=("chat",))
            assert info.value.status == 400

    asyncio.run(scenario())


def test_a_caller_reaches_a_wss_phone_inside_the_call(
    setup: tuple[Registrar, KamailioMain, Pki, int, int],
) -> None:
    """Kamailio speaks UDP only: the dialog is record-routed twice (RFC 5658), a UDP entry for its side and a
    WebSocket one for the phone's, so the caller's ACK and BYE reach the phone over its WebSocket. With one
    entry naming the wss socket, Kamailio could not send them anywhere and the call broke after the 200."""
    reg, kam, pki, _, wss_port = setup
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    phone_contact = f"sip:alice@{BROWSER_HOST};transport=ws"

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"wss://{LOOPBACK}:{wss_port}/", protocols=("sip",), ssl=ctx)
            await ws.send_str(register("alice", 1))
            assert status_code((await final(ws)).encode()) == 200
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as caller:
                caller.bind((LOOPBACK, 0))
                me = caller.getsockname()
                invite = sip_request(
                    "INVITE", "sip:alice@example.com", me, to_uri="sip:alice@example.com",
                    headers=[("Contact", f"<sip:bob@{me[0]}:{me[1]}>")],
                )  # fmt: skip
                caller.sendto(invite, kam.addr)
                got = await asyncio.wait_for(ws.receive(), 8)
                assert got.type is aiohttp.WSMsgType.TEXT and got.data.startswith("INVITE "), got
                rrs = parse_message(got.data.encode()).headers.values("record-route")
                assert len([r for r in rrs if "fl-" in r]) == 2, rrs  # ours: the phone's side on top
                assert ";transport=ws;" in rrs[0] and f":{reg.port};lr>" in rrs[1]
                await ws.send_str(answer(got.data, 200, "OK", phone_contact))
                caller.settimeout(8)
                ok = None
                while ok is None:
                    reply = parse_message(caller.recvfrom(65535)[0])
                    if isinstance(reply, Response) and reply.status == 200:
                        ok = reply
                caller.sendto(in_dialog_request("ACK", ok, me), kam.addr)
                ack = await asyncio.wait_for(ws.receive(), 8)
                assert ack.type is aiohttp.WSMsgType.TEXT and ack.data.startswith(f"ACK {phone_contact} "), (
                    ack
                )
                caller.sendto(in_dialog_request("BYE", ok, me), kam.addr)
                bye = await asyncio.wait_for(ws.receive(), 8)
                assert bye.type is aiohttp.WSMsgType.TEXT and bye.data.startswith(f"BYE {phone_contact} "), (
                    bye
                )
                await ws.send_str(answer(bye.data, 200, "OK"))
                done = parse_message(caller.recvfrom(65535)[0])
                assert isinstance(done, Response) and done.status == 200 and done.cseq.method == "BYE"
            await ws.close()

    asyncio.run(scenario())
    assert "Traceback" not in reg.log()
