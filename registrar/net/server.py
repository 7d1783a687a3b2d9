"""The asyncio shell around the sans-IO stack: UDP and TCP sockets, timers, and draining the stack.

Everything protocol-related happens in :class:`registrar.sip.stack.Stack` and the application core; this
module only moves bytes between sockets and the stack, fires the stack's timers and hands its events to the
core. After every input it drains the stack (``flush``): events first (the core may answer at once), then
the bytes to send, then the next timer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import random
import secrets
import socket
import ssl
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import WSMsgType, web

from registrar.config import Listen, Settings, Transport
from registrar.net import kernel_filter
from registrar.net.limits import BLOCK_FACTOR, Admission, SourceLimit, parse_networks
from registrar.net.tls import HANDSHAKE_TIMEOUT, TlsContexts, describe_failure
from registrar.sip.framing import PING, PONG, FramingError, StreamFramer
from registrar.sip.stack import Event, LocalAddress, Stack
from registrar.sip.transaction import Timers
from registrar.sip.transport import Peer, ip_reference, peer_for_uri
from registrar.sip.uri import parse_uri

log = logging.getLogger("midregistrar.net")

TIMER_GRAIN = 0.01  # seconds: SIP timers are ≥ 500 ms, 10 ms late is nothing; batching saves wake-ups
# The answers to datagrams are held and sent together once the loop has read every datagram waiting on the
# socket (libuv reads up to 32 in a row, then runs what call_soon scheduled): a datagram that wakes its
# receiver costs ~15 µs of our CPU, one sent while the receiver is already awake ~4 µs. At most this many are
# held, so a burst's first answer waits well under 1 ms; a lone datagram's answer leaves a few µs later.
# Answers from refresh templates (registrar/core/refresh.py) are held too: sent at once, each one woke SIPp in
# the middle of its bursts, and the process managed 9,000/s instead of ~20,000/s (bench.throttle_bench).
SEND_BATCH = 8
# A TCP handshake still not done after this many seconds has lost its SYN three times (Linux resends it
# after 1, 3 and 7 s): the next hop is not there. Its transactions fail with 503 rather than at Timer B/F.
CONNECT_TIMEOUT = 10.0
MAX_WS_MESSAGE = 65536  # a SIP message larger than this is refused with the connection
MAIN_RESOLVE_INTERVAL = 60.0  # seconds between look-ups of a main registrar given by name (never limited)


class Application(Protocol):
    """What the shell drives besides the stack: the core's event handler and its own timers."""

    def shortcut(self, data: bytes, peer: Peer, now: float) -> bool:
        """Answer a message the application recognises from its bytes (a repeated refresh); False when the
        stack must parse it."""
        ...

    def handle(self, event: Event, now: float) -> None: ...

    def next_deadline(self) -> float | None: ...

    def on_timer(self, now: float) -> None: ...

    def keep_flow_until(self, conn: int) -> float: ...

    def flow_closed(self, conn: int) -> None: ...


def local_addresses(settings: Settings) -> list[LocalAddress]:
    """Every listen socket as SIP writes it: the advertised host and port, IPv6 in brackets."""
    addresses = []
    for listen in settings.listen:
        host, port = settings.advertised_host(listen)
        addresses.append(LocalAddress(listen.transport.value, ip_reference(host), port))
    return addresses


def build_stack(settings: Settings) -> Stack:
    """A stack whose local addresses are the advertised form of every listen socket."""
    return Stack(
        local_addresses(settings),
        timers=Timers(settings.t1, settings.t2, settings.t4),
        record_route=settings.record_route,
        unique=unique_tokens(),
    )


def unique_tokens() -> Callable[[], str]:
    """12 hex digits (48 random bits) per call for tags and branches. RFC 3261 §19.3 asks for global
    uniqueness and 32 random bits, not secrecy: a generator seeded once from the OS costs 0.3 µs a call, where
    ``secrets.token_hex`` makes a getrandom() system call for every response."""
    bits = random.Random(secrets.randbits(128)).getrandbits
    return lambda: f"{bits(48):012x}"


@dataclass
class _Conn:
    conn_id: int
    transport: asyncio.Transport
    peer: Peer
    framer: StreamFramer
    last_activity: float
    # The (host, port) the connection is known by: the address dialled (maybe a DNS name) for the ones we
    # open, the remote address for the ones accepted.
    addr: tuple[str, int]
    opened: float = 0.0
    accepted: bool = False  # counted by the Admission until it closes
    used: bool = False  # it has carried a SIP message (keep-alives do not count)


class SipServer:
    """Listens on every configured socket and drives one stack."""

    def __init__(
        self,
        settings: Settings,
        stack: Stack,
        app: Application,
        exempt: Callable[[str], bool] | None = None,
    ) -> None:
        """``exempt(host)``: whether a source is one of this registrar's own (another process handing over
        requests); asked only of a source over --source-rate-limit."""
        self.settings = settings
        self.stack = stack
        self.app = app
        self._shortcut = app.shortcut
        self.loop = asyncio.get_running_loop()
        self._udp: dict[int, asyncio.DatagramTransport] = {}
        self._held = 0  # datagrams handled whose answers wait for the end of the loop iteration
        self._servers: list[asyncio.Server] = []
        self._conns: dict[int, _Conn] = {}
        self._by_addr: dict[tuple[str, int], int] = {}
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        self._next_conn = 1
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._closing = False
        self._ip_hosts: dict[str, bool] = {}  # host text -> is an IP literal (ipaddress takes ~5 µs)
        self.tls = TlsContexts(settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.tls_ca)
        self._tls_task: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()  # TLS handshakes in progress (kept referenced)
        self._tls_listeners: dict[int, socket.socket] = {}  # listen index -> its listening socket
        self._accepting: list[asyncio.Task[None]] = []
        self.admission = Admission(settings.max_connections, settings.max_connections_per_source)
        self._refused_logged = 0.0
        self._exempt = exempt
        self._main_hosts: set[str] = set()  # the main registrar's (and outbound proxy's) addresses
        self._main_task: asyncio.Task[None] | None = None
        self.sources = SourceLimit(
            settings.source_rate_limit,
            parse_networks(settings.trusted_sources),
            settings.source_block_seconds,
            self._own_source,
        )
        self._block_task: asyncio.Task[None] | None = None
        self._kernel_filter = True  # until the kernel refuses one
        self._filtered: set[str] = set()  # the sources the kernel filter now drops
        # None when off: the hot path then skips the call altogether.
        self._allow = self.sources.allow if settings.source_rate_limit else None
        self._ws_sockets: dict[int, socket.socket] = {}  # listen index -> the WebSocket server's socket
        self._ws_runners: list[web.AppRunner] = []

    @property
    def now(self) -> float:
        """Wall-clock seconds: binding expiries are absolute times that other processes (sharing a store)
        must read the same way; timers are converted to the loop's clock when armed."""
        return time.time()

    async def start(self) -> None:
        for index, listen in enumerate(self.settings.listen):
            if listen.transport is Transport.UDP:
                transport, _ = await self.loop.create_datagram_endpoint(
                    lambda i=index: _UdpProtocol(self, i),  # type: ignore[misc]
                    local_addr=(listen.host, listen.port),
                )
                _grow_receive_buffer(transport, self.settings.udp_receive_buffer)
                self._udp[index] = transport
            elif listen.transport in (Transport.WS, Transport.WSS):
                await self._serve_websocket(listen, index)
            elif listen.transport is Transport.TLS:
                # Our own accept loop: each connection's handshake is awaited (:meth:`_upgrade`), so a
                # failed one is ours to log and count, where a TLS server socket would drop it silently.
                family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
                sock = socket.create_server((listen.host, listen.port), family=family, backlog=1024)
                sock.setblocking(False)
                self._tls_listeners[index] = sock
                self._accepting.append(self.loop.create_task(self._accept_tls(sock, index)))
            else:
                server = await self.loop.create_server(
                    lambda i=index: _TcpProtocol(self, i),  # type: ignore[misc]
                    listen.host,
                    listen.port,
                    reuse_address=True,
                )
                self._servers.append(server)
        self._idle_task = self.loop.create_task(self._close_idle())
        if self._allow is not None and await self._resolve_main():
            self._main_task = self.loop.create_task(self._watch_main())
        if self._allow is not None and self.settings.source_block_seconds:
            self._block_task = self.loop.create_task(self._lift_blocks())
        if self.tls.server is not None:
            self._tls_task = self.loop.create_task(self._watch_certificate())

    def bound(self) -> list[Listen]:
        """The sockets actually bound (port 0 resolved)."""
        out = []
        udp = iter(sorted(self._udp.items()))
        tcp = iter(self._servers)
        for index, listen in enumerate(self.settings.listen):
            if listen.transport is Transport.UDP:
                _, transport = next(udp)
                host, port = transport.get_extra_info("sockname")[:2]
            elif listen.transport is Transport.TLS:
                host, port = self._tls_listeners[index].getsockname()[:2]
            elif listen.transport in (Transport.WS, Transport.WSS):
                host, port = self._ws_sockets[index].getsockname()[:2]
            else:
                server = next(tcp)
                host, port = server.sockets[0].getsockname()[:2]
            out.append(Listen(transport=listen.transport, host=host, port=port))
        return out

    async def close(self) -> None:
        self._closing = True  # connections lost from now on are ours to close, not transport errors
        if self._timer is not None:
            self._timer.cancel()
        if self._idle_task is not None:
            self._idle_task.cancel()
        if self._tls_task is not None:
            self._tls_task.cancel()
        if self._main_task is not None:
            self._main_task.cancel()
        if self._block_task is not None:
            self._block_task.cancel()
        for task in self._accepting:
            task.cancel()
        for sock in self._tls_listeners.values():
            sock.close()
        for runner in self._ws_runners:
            await runner.cleanup()
        for server in self._servers:
            server.close()
        for conn in list(self._conns.values()):
            conn.transport.close()
        for transport in self._udp.values():
            transport.close()
        for server in self._servers:
            await server.wait_closed()

    # ------------------------------------------------------------------------------------ input

    def datagram(self, data: bytes, addr: tuple[str, int], index: int) -> None:
        now = time.time()
        allow = self._allow
        if allow is not None and not allow(addr[0], now):
            self._dropped(now)  # a flood's: before any parsing, unanswered
            return
        peer = Peer("udp", addr[0], addr[1], None, index)
        self._held += 1
        if not self._shortcut(data, peer, now):  # a repeated refresh is answered from its template
            self.stack.receive(data, peer, now)
            if self._held < SEND_BATCH:
                self._dispatch()  # handled now, answered with the other datagrams read in this iteration
        if self._held >= SEND_BATCH:
            self.flush()
        elif self._held == 1:
            self.loop.call_soon(self._flush_held)

    def _flush_held(self) -> None:
        if self._held:
            self.flush()

    def stream_data(self, conn: _Conn, data: bytes) -> None:
        conn.last_activity = now = self.now
        allow = self._allow
        for item in conn.framer.feed(data):
            if allow is not None and not isinstance(item, FramingError) and not allow(conn.peer.host, now):
                self._dropped(now)  # over the source's rate: the message (or keep-alive) is not looked at
                continue
            if item is PING:
                conn.transport.write(PONG)  # RFC 5626 keep-alive
            elif isinstance(item, FramingError):
                # The stream cannot be split any more (e.g. a wrong Content-Length): drop the connection.
                log.info("closing %s: %s", conn.peer, item)
                self.stack.stats.parse_errors += 1
                conn.transport.close()
                break
            elif isinstance(item, bytes):
                conn.used = True
                now = self.now
                if not self.app.shortcut(item, conn.peer, now):
                    self.stack.receive(item, conn.peer, now)
        self.flush()

    def fire_timers(self) -> None:
        # The loop's clock and the wall clock differ by rounding (uvloop timers have 1 ms resolution): treat
        # the deadline we armed for as reached, or the timer would re-fire in a tight loop until it is.
        now = max(self.now, self._timer_at or 0.0)
        self._timer = None
        self._timer_at = None
        self.stack.handle_timers(now)
        try:
            self.app.on_timer(now)
        except Exception:
            log.exception("timer handler failed")
        self.flush()

    # ------------------------------------------------------------------------------------ output

    def _dispatch(self) -> None:
        """Hand the stack's events to the application until there are none."""
        stack = self.stack
        while True:
            events = stack.pop_events()
            if not events:
                break
            now = self.now
            for event in events:
                try:
                    self.app.handle(event, now)
                except Exception:  # a bug in one request must not stop the engine
                    log.exception("handler failed for %s", type(event).__name__)

    def flush(self) -> None:
        stack = self.stack
        self._dispatch()
        self._held = 0
        for data, peer in stack.pop_outgoing():
            self.send(data, peer)
        deadline = _earliest(stack.next_deadline(), self.app.next_deadline())
        if deadline is None:
            return
        # Timers due within the same TIMER_GRAIN fire together: one wake-up per grain, not one per timer.
        deadline = math.ceil(deadline / TIMER_GRAIN) * TIMER_GRAIN
        if self._timer_at is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(max(0.0, deadline - self.now), self.fire_timers)
            self._timer_at = deadline

    def send(self, data: bytes, peer: Peer) -> None:
        if peer.transport == "udp":
            transport = self._udp.get(peer.local) or next(iter(self._udp.values()), None)
            if transport is None:
                log.warning("no UDP socket to reach %s", peer)
                return
            host = peer.host
            if self._ip_hosts.get(host) or self._is_ip(host):
                transport.sendto(data, (host, peer.port))
            else:
                self.loop.create_task(self._resolve_and_send(transport, data, peer))
            return
        conn = self._conns.get(peer.conn) if peer.conn is not None else None
        if conn is None:
            conn_id = self._by_addr.get((peer.host, peer.port))
            conn = self._conns.get(conn_id) if conn_id is not None else None
        if conn is not None and not conn.transport.is_closing():
            conn.transport.write(data)
            conn.last_activity = self.now
            return
        if peer.transport in ("ws", "wss"):
            # Only phones open WebSocket connections; one that is gone cannot be dialled back.
            log.info("no WebSocket connection to %s any more", peer)
            if not self._closing:
                self.stack.transport_error(peer, self.now)
            return
        key = (peer.host, peer.port)
        queue = self._pending.get(key)
        if queue is not None:
            queue.append(data)
            return
        self._pending[key] = [data]
        self.loop.create_task(self._connect(peer))

    def _is_ip(self, host: str) -> bool:
        """Whether ``host`` is an IP literal (sent at once) or a name (resolved first); one check per
        response, so the answers are kept, up to 65,536 hosts."""
        known = self._ip_hosts.get(host)
        if known is not None:
            return known
        try:
            ipaddress.ip_address(host)
        except ValueError:
            known = False
        else:
            known = True
        if len(self._ip_hosts) >= 65536:
            self._ip_hosts.clear()
        self._ip_hosts[host] = known
        return known

    async def _resolve_and_send(self, transport: asyncio.DatagramTransport, data: bytes, peer: Peer) -> None:
        try:
            infos = await self.loop.getaddrinfo(peer.host, peer.port, type=2)  # SOCK_DGRAM
        except OSError as exc:
            log.warning("cannot resolve %s: %s", peer.host, exc)
            return
        transport.sendto(data, infos[0][4][:2])

    async def _connect(self, peer: Peer) -> None:
        key = (peer.host, peer.port)
        tls = peer.transport == "tls"
        index = self._listen_index(peer.transport)
        try:
            await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: _TcpProtocol(self, index, key, tls=tls),
                    peer.host,
                    peer.port,
                    # Verified against --tls-ca (or the system's CAs), the name or address dialled included.
                    ssl=self.tls.client if tls else None,
                    server_hostname=peer.host if tls else None,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT if tls else None,
                ),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            if tls and isinstance(exc, ssl.SSLError | TimeoutError):
                self.tls.stats.failed("client")
                log.warning("TLS handshake with %s failed: %s", peer, describe_failure(exc))
            else:
                log.warning("cannot connect to %s: %s", peer, str(exc) or "timed out")
            self._pending.pop(key, None)
            if not self._closing:
                self.stack.transport_error(peer, self.now)
                self.flush()

    # ------------------------------------------------------------------------------------ connections

    def _listen_index(self, transport: str) -> int:
        """The listening socket a connection we open belongs to: the first of its transport (its address is
        what our Via says), else the first TCP one, else the first."""
        for wanted in (transport, "tcp"):
            for i, listen in enumerate(self.settings.listen):
                if listen.transport.value == wanted:
                    return i
        return 0

    # ------------------------------------------------------------------------------------ WebSocket

    async def _serve_websocket(self, listen: Listen, index: int) -> None:
        """SIP over WebSocket (RFC 7118) on aiohttp: any path, subprotocol ``sip``; WSS with the TLS
        certificate of the tls: sockets (reloaded the same way)."""
        app = web.Application()
        app.router.add_get("/{path:.*}", lambda request: self._websocket(request, index))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        sock = socket.create_server((listen.host, listen.port), family=family, backlog=1024)
        secure = listen.transport is Transport.WSS
        await web.SockSite(runner, sock, ssl_context=self.tls.server if secure else None).start()
        self._ws_sockets[index] = sock
        self._ws_runners.append(runner)

    async def _websocket(self, request: web.Request, index: int) -> web.StreamResponse:
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        if "sip" not in (p.strip().lower() for p in offered.split(",")):
            # RFC 7118 §4.1: the client must ask for the "sip" subprotocol.
            return web.Response(status=400, text="Sec-WebSocket-Protocol: sip is required (RFC 7118)\n")
        transport = request.transport
        if transport is None:
            return web.Response(status=400)
        host = transport.get_extra_info("peername")[0]
        if self._refused(host):
            return web.Response(status=503, text="too many connections\n")
        ws = web.WebSocketResponse(protocols=("sip",), max_msg_size=MAX_WS_MESSAGE)
        try:
            await ws.prepare(request)
        except BaseException:
            self.admission.release(host)
            raise
        name = self.settings.listen[index].transport.value
        # Written to like a stream transport (write, close, is_closing, get_extra_info).
        ws_transport = typing.cast(asyncio.Transport, _WsTransport(ws, transport))
        conn = self.connection_made(ws_transport, index, None, name)
        conn.accepted = True
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    self.message(conn, msg.data.encode())
                elif msg.type is WSMsgType.BINARY:
                    self.message(conn, msg.data)
        finally:
            self.connection_lost(conn)
        return ws

    def message(self, conn: _Conn, data: bytes) -> None:
        """One SIP message of a message-framed connection (WebSocket)."""
        now = self.now
        conn.last_activity = now
        if self._allow is not None and not self._allow(conn.peer.host, now):
            self._dropped(now)
            return
        if not data.strip(b"\r\n"):
            return  # a keep-alive
        conn.used = True
        if not self.app.shortcut(data, conn.peer, now):
            self.stack.receive(data, conn.peer, now)
        self.flush()

    async def _accept_tls(self, sock: socket.socket, index: int) -> None:
        while True:
            try:
                conn, _ = await self.loop.sock_accept(sock)
            except OSError as exc:  # e.g. out of file descriptors: keep accepting once some are back
                log.warning("accepting TLS connections on %s failed: %s", self.settings.listen[index], exc)
                await asyncio.sleep(0.1)
                continue
            try:
                host = conn.getpeername()[0]
            except OSError:  # gone already
                conn.close()
                continue
            if self._refused(host):  # refused before the handshake: a flood costs no TLS work
                conn.close()
                continue
            task = self.loop.create_task(self._upgrade(conn, index, host))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _upgrade(self, sock: socket.socket, index: int, host: str) -> None:
        """The TLS handshake of an accepted connection; a failure is logged, counted and closes it."""
        assert self.tls.server is not None
        try:
            peername = sock.getpeername()
        except OSError:  # gone already
            self.admission.release(host)
            sock.close()
            return
        try:
            await self.loop.connect_accepted_socket(
                lambda: _TcpProtocol(self, index, tls=True),
                sock,
                ssl=self.tls.server,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.admission.release(host)
            self.tls.stats.failed("server")
            log.warning("TLS handshake from %s failed: %s", _addr_text(peername), describe_failure(exc))
            sock.close()

    async def _watch_certificate(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tls_reload_interval)
            self.tls.reload_if_changed()

    def _refused(self, host: str) -> bool:
        """Whether a connection accepted from ``host`` must be closed at once (--max-connections,
        --max-connections-per-source), counted if so; else it is counted as open from ``host``."""
        reason = self.admission.admit(host, len(self._conns) + len(self._handshakes))
        if reason is None:
            return False
        now = self.now
        if now - self._refused_logged >= 10.0:  # one line per 10 s, however hard the flood
            self._refused_logged = now
            if reason == "per_source":
                log.warning(
                    "%d connections open from %s: refusing new ones from it (--max-connections-per-source)",
                    self.admission.from_source(host),
                    host,
                )
            else:
                log.warning("%d connections open: refusing new ones (--max-connections)", len(self._conns))
        return True

    def _dropped(self, now: float) -> None:
        """A message over --source-rate-limit was dropped: a log line now and then, never one per message;
        a source just blocked is filtered in the kernel from now on."""
        sources = self.sources
        if sources.changed:
            self._filter(sources.take_blocked())
        line = sources.report(now)
        if line is not None:
            log.warning("%s", line)

    def _filter(self, blocked: list[str] | None) -> None:
        """Put the blocked sources in every UDP socket's kernel filter (none: take the filter off)."""
        if blocked is None or not self._kernel_filter:
            return
        for transport in self._udp.values():
            sock = transport.get_extra_info("socket")
            if sock is None:
                continue
            try:
                if blocked:
                    kernel_filter.attach(sock, blocked)
                else:
                    kernel_filter.detach(sock)
            except (OSError, ValueError, TypeError) as exc:
                self._kernel_filter = False  # dropped one by one from now on
                log.warning("cannot filter blocked sources in the kernel (%s): dropping them here", exc)
                return
        new = [host for host in blocked if host not in self._filtered]
        self._filtered = set(blocked)
        if new:  # one line per block, however many datagrams it then keeps out
            now = self.now
            until = self.sources.blocked
            log.warning(
                "blocking %s in the kernel: %d× --source-rate-limit within one second",
                ", ".join(f"{h} for {until.get(h, now) - now:.0f} s" for h in new[:5])
                + (f" and {len(new) - 5} more" if len(new) > 5 else ""),
                BLOCK_FACTOR,
            )

    async def _lift_blocks(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sources.expire(self.now)
            self._filter(self.sources.take_blocked())

    def _own_source(self, host: str) -> bool:
        """The main registrar (its addresses as last resolved) or another registrar process."""
        if host.startswith("::ffff:"):  # an IPv4 source on a dual-stack socket
            host = host[7:]
        return host in self._main_hosts or (self._exempt is not None and self._exempt(host))

    async def _resolve_main(self) -> bool:
        """Look up the main registrar's and the outbound proxy's addresses; True when one is a name (to be
        looked up again now and then: its addresses may change)."""
        hosts: set[str] = set()
        named = False
        for uri in (self.settings.main_registrar, self.settings.main_proxy):
            if not uri:
                continue
            host = peer_for_uri(parse_uri(uri)).host
            if self._is_ip(host):
                hosts.add(host)
                continue
            named = True
            try:
                infos = await self.loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
            except OSError as exc:
                log.warning("cannot resolve the main registrar %s: %s", host, exc)
                hosts |= self._main_hosts  # keep what was known
                continue
            hosts |= {str(info[4][0]) for info in infos}
        self._main_hosts = hosts
        return named

    async def _watch_main(self) -> None:
        while True:
            await asyncio.sleep(MAIN_RESOLVE_INTERVAL)
            await self._resolve_main()

    def connection_counts(self) -> dict[str, int]:
        """Open connections by transport (tcp, tls, ws, wss)."""
        counts: dict[str, int] = {}
        for conn in self._conns.values():
            counts[conn.peer.transport] = counts.get(conn.peer.transport, 0) + 1
        return counts

    def connection_made(
        self, transport: asyncio.Transport, index: int, dialled: tuple[str, int] | None, name: str = "tcp"
    ) -> _Conn:
        host, port = transport.get_extra_info("peername")[:2]
        conn_id = self._next_conn
        self._next_conn += 1
        addr = dialled or (host, port)
        peer = Peer(name, host, port, conn_id, index)
        conn = _Conn(conn_id, transport, peer, StreamFramer(), self.now, addr, opened=self.now)
        self._conns[conn_id] = conn
        self._by_addr[addr] = conn_id
        for data in self._pending.pop(addr, []):
            transport.write(data)
        return conn

    def connection_lost(self, conn: _Conn) -> None:
        """A connection closed or reset: client transactions whose request it carried and that still wait
        for their final response fail now (a response on a closed connection can only come back on a new
        one the peer opens, and the peer has most likely gone)."""
        if self._conns.pop(conn.conn_id, None) is not None and conn.accepted:
            self.admission.release(conn.peer.host)
        self.app.flow_closed(conn.conn_id)
        if self._by_addr.get(conn.addr) == conn.conn_id:
            del self._by_addr[conn.addr]
        if not self._closing:
            host, port = conn.addr
            self.stack.transport_error(Peer(conn.peer.transport, host, port, None, conn.peer.local), self.now)
            self.flush()

    async def _close_idle(self) -> None:
        """Close connections that carry nothing: an accepted one that sent no SIP message within
        --new-connection-timeout (a flood's), and any idle for --tcp-idle-timeout whose flow no binding
        needs."""
        timeout = self.settings.tcp_idle_timeout
        first = self.settings.new_connection_timeout
        while True:
            await asyncio.sleep(min(timeout / 4, first / 4, 5.0))
            now = self.now
            limit = now - timeout
            for conn in list(self._conns.values()):
                if conn.accepted and not conn.used and now - conn.opened >= first:
                    log.debug("closing %s: no SIP message in %g s", conn.peer, first)
                    self.admission.close_for_silence("first_message")
                    conn.transport.close()
                elif conn.last_activity < limit and self.app.keep_flow_until(conn.conn_id) < now:
                    log.debug("closing idle connection %s", conn.peer)
                    self.admission.close_for_silence("idle")
                    conn.transport.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: SipServer, index: int) -> None:
        self.server = server
        self.index = index

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        # An IP socket's source address is a (host, port, ...) tuple of str and int.
        self.server.datagram(data, typing.cast(tuple[str, int], addr), self.index)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)


class _TcpProtocol(asyncio.Protocol):
    """A SIP stream over TCP or, once secured, TLS."""

    def __init__(
        self, server: SipServer, index: int, dialled: tuple[str, int] | None = None, *, tls: bool = False
    ) -> None:
        self.server = server
        self.index = index
        self.dialled = dialled
        self.tls = tls
        self.conn: _Conn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = typing.cast(asyncio.Transport, transport)
        accepted = self.dialled is None
        if accepted and not self.tls and self.server._refused(transport.get_extra_info("peername")[0]):
            transport.close()  # over a connection limit (TLS ones are refused before the handshake)
            return
        self.conn = self.server.connection_made(
            transport, self.index, self.dialled, "tls" if self.tls else "tcp"
        )
        self.conn.accepted = accepted  # a TLS one was counted when accepted, before its handshake

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.server.stream_data(self.conn, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.server.connection_lost(self.conn)


class _WsTransport:
    """A WebSocket connection seen as the transport of a SIP connection: each write is one WebSocket message
    (text, as SIP is; binary if a body is not UTF-8)."""

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.BaseTransport) -> None:
        self.ws = ws
        self.transport = transport
        self._tasks: set[asyncio.Task[None]] = set()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.transport.get_extra_info(name, default)

    def write(self, data: bytes) -> None:
        try:
            send = self.ws.send_str(data.decode())
        except UnicodeDecodeError:
            send = self.ws.send_bytes(data)
        # aiohttp writes the frame before its first await: messages leave in the order they were written.
        task = asyncio.get_running_loop().create_task(self._send(send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _send(send: typing.Awaitable[None]) -> None:
        try:
            await send
        except (ConnectionError, RuntimeError) as exc:  # closed meanwhile: like a lost datagram
            log.debug("WebSocket send failed: %s", exc)

    def is_closing(self) -> bool:
        return self.ws.closed or self.transport.is_closing()

    def close(self) -> None:
        self.transport.close()


def _addr_text(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{ip_reference(str(addr[0]))}:{addr[1]}"
    return str(addr)


def _grow_receive_buffer(transport: asyncio.BaseTransport, size: int) -> None:
    """A deep kernel queue rides out short stalls (a GC pause, a burst) instead of dropping datagrams."""
    sock = transport.get_extra_info("socket")
    if sock is None or size <= 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError as exc:  # pragma: no cover - refused by the kernel: keep its default
        log.warning("cannot set SO_RCVBUF to %d: %s", size, exc)


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)
