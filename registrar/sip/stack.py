"""The sans-IO SIP stack: transactions, proxy core and stateless error replies behind one object.

Shaped like aioquic's ``QuicConnection``: the shell feeds it (:meth:`Stack.receive` for bytes from a peer,
:meth:`Stack.handle_timers` when :meth:`Stack.next_deadline` passes, :meth:`Stack.transport_error` when a
connection cannot be opened or is lost) and drains it after every call
(:meth:`Stack.pop_outgoing` for bytes to send, :meth:`Stack.pop_events` for what the application must act
on). The application answers with commands (:meth:`respond`, :meth:`proxy`, :meth:`finish`,
:meth:`send_request`). Time is always passed in, so every rule can be tested without sleeping.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from registrar.sip.errors import ParseError
from registrar.sip.headers import Params, Via, parse_address, parse_via_sent_by, split_commas
from registrar.sip.latency import Histogram
from registrar.sip.message import (
    Header,
    Headers,
    Request,
    Response,
    make_response,
    parse_message,
    parse_via_list,
    typed_header,
)
from registrar.sip.proxy import (
    Branch,
    ResponseContext,
    build_cancel,
    flow_token,
    forward_copy,
    is_loop,
    make_branch,
    strip_top_via,
)
from registrar.sip.stun import binding_response
from registrar.sip.transaction import (
    TIMEOUT,
    ClientKey,
    ClientTransaction,
    InviteClient,
    InviteServer,
    NonInviteClient,
    NonInviteServer,
    ServerKey,
    ServerTransaction,
    State,
    Timed,
    Timer,
    Timers,
    client_key,
    server_key,
)
from registrar.sip.transport import Peer, response_peer, uri_transport
from registrar.sip.uri import URI, SipURI


@dataclass(frozen=True, slots=True)
class LocalAddress:
    """One listening socket as it is written in Via / Record-Route / Contact (the advertised address;
    ``host`` in SIP form, an IPv6 address in brackets: :func:`~registrar.sip.transport.ip_reference`)."""

    transport: str
    host: str
    port: int

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"


def ip_family(host: str) -> int | None:
    """4 or 6 for an IP literal (an IPv6 one with or without brackets), None for a name."""
    if ":" in host:
        return 6
    return 4 if host.replace(".", "").isdigit() else None


def _fits(local_host: str, family: int | None) -> bool:
    local = ip_family(local_host)
    return family is None or local is None or local == family


# --- events handed to the application ---------------------------------------------------------------


@dataclass(slots=True)
class IncomingRequest:
    """A new request (not a retransmission, not an ACK/CANCEL the stack handled) for the application."""

    txn: ServerTransaction
    request: Request
    peer: Peer
    data: bytes = b""  # the message as received (what a refresh template is learned from)


@dataclass(slots=True)
class ProxyFinal:
    """The final response chosen for a proxied request held for the application (``hold_final``)."""

    ctx: ResponseContext
    response: Response


@dataclass(slots=True)
class ClientResult:
    """Final response for a request the application originated: received, or synthesized when none came
    (408 when Timer F fired, ``timed_out``; 503 when the transport failed)."""

    handle: int
    request: Request
    response: Response
    timed_out: bool = False


@dataclass(slots=True)
class StrayAck:
    """An ACK for a 2xx (its own transaction): routed end to end by the application."""

    request: Request
    peer: Peer


Event = IncomingRequest | ProxyFinal | ClientResult | StrayAck


REGISTER_OUTCOMES = ("absorbed", "relayed", "refused")


@dataclass
class StackStats:
    """Counters the shell exports as metrics."""

    requests_in: dict[str, int] = field(default_factory=dict)
    responses_out: dict[tuple[str, int], int] = field(default_factory=dict)  # (method, status) → count
    parse_errors: int = 0
    retransmissions_absorbed: int = 0
    stun_keepalives: int = 0  # STUN Binding requests answered on a UDP SIP port (RFC 5626 §8)
    loops: int = 0
    # Final answers of the next hop passed on by :meth:`Stack.finish` (a relayed REGISTER's answer from the
    # main registrar, 408 when it never came): (method, status) → count.
    relayed_answers: dict[tuple[str, int], int] = field(default_factory=dict)
    # Seconds from a REGISTER's arrival to its final answer, by outcome: answered here 2xx ("absorbed") or
    # not ("refused"), or the main registrar's answer to it passed on ("relayed").
    register_latency: dict[str, Histogram] = field(
        default_factory=lambda: {outcome: Histogram() for outcome in REGISTER_OUTCOMES}
    )


# A timer in the heap: (deadline, unique sequence number, id of the transaction, timer). Plain tuples
# compare in C; the unique sequence number settles ties, so the rest is never compared.
_HeapEntry = tuple[float, int, int, Timer]


class Stack:
    """Transactions + stateful proxy core for one process. One instance, driven by one event loop."""

    def __init__(
        self,
        locals_: list[LocalAddress],
        *,
        timers: Timers | None = None,
        record_route: bool = False,
        unique: Callable[[], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: the wall clock the shell's ``now`` values come from; read when a REGISTER is answered,
        for its latency (:attr:`StackStats.register_latency`)."""
        if not locals_:
            raise ValueError("the stack needs at least one local address")
        self.locals = locals_
        self.timers = timers or Timers()
        self.record_route = record_route
        self._unique = unique
        self._clock = clock
        self.stats = StackStats()
        self._now = 0.0
        self._out: list[tuple[bytes, Peer]] = []
        self._events: list[Event] = []
        self._heap: list[_HeapEntry] = []
        # The live timers of each transaction, by id (the transaction, timer -> sequence number): a heap entry
        # whose number is not there any more was disarmed or re-armed, and a terminated transaction drops
        # them all at once. The heap holds ids, not transactions, so an ended transaction is freed at once
        # instead of lingering until its last (cancelled) timer's deadline.
        self._armed: dict[int, tuple[Timed, dict[Timer, int]]] = {}
        self._seq = itertools.count()
        self._servers: dict[ServerKey, ServerTransaction] = {}
        # Answered non-INVITE server transactions over UDP, for Timer J: the key joined into one string ->
        # the response bytes. A dict of str -> bytes is never tracked by the cyclic GC (a dict holding tuples
        # is, and a full collection then walks every entry: 10-30 ms with 32 s of traffic in it). Every entry
        # lingers for the same 64*T1, so a FIFO of (deadline, key) replaces timer-heap entries.
        self._completed: dict[str, bytes] = {}
        self._completed_fifo: deque[tuple[float, str]] = deque()
        self._clients: dict[ClientKey, ClientTransaction] = {}
        # Client transactions over connection-oriented transports: the ones a lost connection can fail.
        self._reliable_clients: set[ClientTransaction] = set()
        self._ctx_of_server: dict[int, ResponseContext] = {}
        self._ctx_of_client: dict[int, ResponseContext] = {}
        self._handles: dict[int, int] = {}
        self._handle_seq = itertools.count(1)
        self._local_vias = {(a.host.lower(), a.port) for a in locals_}

    # ------------------------------------------------------------------------------------ outputs

    def pop_outgoing(self) -> list[tuple[bytes, Peer]]:
        out = self._out
        if out:  # (an empty list is handed out as it is: the shell asks after every datagram)
            self._out = []
        return out

    def pop_events(self) -> list[Event]:
        events = self._events
        if events:
            self._events = []
        return events

    def next_deadline(self) -> float | None:
        fifo = self._completed_fifo
        linger = fifo[0][0] if fifo else None
        heap = self._heap
        while heap:
            deadline, seq, key, timer = heap[0]
            if self._live(key, timer, seq):
                return deadline if linger is None or deadline < linger else linger
            heapq.heappop(heap)
        return linger

    @property
    def active_transactions(self) -> int:
        return len(self._servers) + len(self._clients) + len(self._completed)

    @property
    def pending_transactions(self) -> int:
        """Transactions still waiting for a final response (what a draining process must let finish)."""
        open_states = (State.CALLING, State.TRYING, State.PROCEEDING)
        servers = sum(1 for t in self._servers.values() if t.state in open_states)
        return servers + sum(1 for t in self._clients.values() if t.state in open_states)

    # ------------------------------------------------------------------------------------ Outbox

    def send(self, data: bytes, peer: Peer) -> None:
        self._out.append((data, peer))

    def arm(self, txn: Timed, timer: Timer, delay: float) -> None:
        seq = next(self._seq)
        key = id(txn)
        entry = self._armed.get(key)
        if entry is None:
            entry = self._armed[key] = (txn, {})
        entry[1][timer] = seq
        heapq.heappush(self._heap, (self._now + delay, seq, key, timer))

    def disarm(self, txn: Timed, timer: Timer) -> None:
        entry = self._armed.get(id(txn))
        if entry is not None:
            entry[1].pop(timer, None)

    def _live(self, key: int, timer: Timer, seq: int) -> bool:
        entry = self._armed.get(key)
        return entry is not None and entry[1].get(timer) == seq

    def response_in(self, txn: ClientTransaction, response: Response) -> None:
        ctx = self._ctx_of_client.get(id(txn))
        if ctx is not None:
            self._proxy_response(ctx, txn, response)
        elif response.status >= 200 and id(txn) in self._handles:
            handle = self._handles.pop(id(txn))
            self._events.append(ClientResult(handle, txn.request, response))

    def failed(self, txn: ClientTransaction, status: int) -> None:
        """No response will come (Timer B/F, a transport error): the TU gets a local ``status`` response
        instead, the way a proxy treats a branch that timed out (§16.7 step 2, §16.9)."""
        response = make_response(txn.request, status)
        ctx = self._ctx_of_client.get(id(txn))
        if ctx is not None:
            self._proxy_response(ctx, txn, response)
        elif id(txn) in self._handles:
            handle = self._handles.pop(id(txn))
            self._events.append(ClientResult(handle, txn.request, response, timed_out=status == TIMEOUT))

    def completed(self, txn: NonInviteServer, data: bytes, peer: Peer, timer_j: float) -> None:
        """A non-INVITE server transaction sent its final response: for Timer J the stack keeps just those
        bytes (§17.2.2) and drops the object. Over a reliable transport Timer J is zero: it ends at once."""
        self._armed.pop(id(txn), None)
        self._ctx_of_server.pop(id(txn), None)
        key = txn.key
        if self._servers.get(key) is txn:
            del self._servers[key]
        if timer_j <= 0:
            return
        flat = _flat_key(key)
        if flat not in self._completed:  # (a key comes back only after its entry expired)
            self._completed_fifo.append((self._now + timer_j, flat))
        self._completed[flat] = data

    def _resend_completed(self, key: ServerKey, via: Via, peer: Peer) -> bool:
        """A retransmitted request of an answered non-INVITE transaction: send the same response again, to
        where this copy says responses go (the same place as the first: same Via, same source)."""
        data = self._completed.get(_flat_key(key))
        if data is None:
            return False
        self.stats.retransmissions_absorbed += 1
        self.send(data, response_peer(via, peer))
        return True

    def terminated(self, txn: ServerTransaction | ClientTransaction) -> None:
        self._armed.pop(id(txn), None)
        if isinstance(txn, InviteServer | NonInviteServer):
            if self._servers.get(txn.key) is txn:
                del self._servers[txn.key]
            self._ctx_of_server.pop(id(txn), None)
        else:
            if self._clients.get(txn.key) is txn:
                del self._clients[txn.key]
            self._reliable_clients.discard(txn)
            self._ctx_of_client.pop(id(txn), None)
            self._handles.pop(id(txn), None)

    # ------------------------------------------------------------------------------------ inputs

    def handle_timers(self, now: float) -> None:
        self._now = now
        fifo = self._completed_fifo
        if fifo and fifo[0][0] <= now:
            completed = self._completed
            while fifo and fifo[0][0] <= now:
                completed.pop(fifo.popleft()[1], None)
        while self._heap and self._heap[0][0] <= now:
            _, seq, key, timer = heapq.heappop(self._heap)
            entry = self._armed.get(key)
            if entry is None or entry[1].get(timer) != seq:
                continue
            txn, timers = entry
            del timers[timer]
            txn.on_timer(timer)

    def transport_error(self, peer: Peer, now: float) -> None:
        """A connection to ``peer``'s address (host and port as the request was sent to them) could not be
        opened (refused, unreachable, timed out) or was lost: every client transaction whose request went
        there and is still waiting fails at once with a local 503 (RFC 3261 §17.1.4, §8.1.3.1) instead of
        waiting for Timer B/F."""
        self._now = now
        if not peer.reliable:
            return
        host, port = peer.host, peer.port
        for txn in [t for t in self._reliable_clients if t.peer.host == host and t.peer.port == port]:
            txn.on_transport_error()

    def receive(self, data: bytes, peer: Peer, now: float) -> None:
        """Bytes of one datagram (or one framed stream message) arrived from a peer."""
        self._now = now
        if not data.strip(b"\r\n"):
            return  # keep-alive
        if data[0] <= 1 and not peer.reliable:  # no SIP message starts so: a STUN keep-alive (RFC 5626 §8)
            self._stun(data, peer)
            return
        try:
            msg = parse_message(data, stream=peer.stream)
        except ParseError as exc:
            self.stats.parse_errors += 1
            self._reject_unparsable(data, peer, exc)
            return
        if isinstance(msg, Response):
            self._receive_response(msg)
        else:
            self._receive_request(msg, peer, data)

    def _stun(self, data: bytes, peer: Peer) -> None:
        """Answer a STUN Binding request on the SIP port; anything else starting so is dropped as garbage."""
        answer = binding_response(data, peer.host, peer.port)
        if answer is None:
            self.stats.parse_errors += 1
            return
        self.stats.stun_keepalives += 1
        self.send(answer, peer)

    # ------------------------------------------------------------------------------------ known requests
    # A request the application recognised from its bytes alone (a repeated refresh, registrar.core.refresh)
    # is answered without a transaction object: these two count it as the stack would, leave a transaction
    # that is still open (or answered, for Timer J) to it, and send the answer statelessly.

    def recognised(self, key: ServerKey, peer: Peer, now: float) -> bool | None:
        """Where a request recognised without parsing stands. True when it retransmits an answered
        transaction: counted, and its answer sent to ``peer`` again (§17.2.2); None when a transaction for
        it is still open (the caller must hand the bytes to :meth:`receive`); False when it is new (nothing
        counted yet: :meth:`answer_recognised` does)."""
        self._now = now
        if key in self._servers:
            return None
        data = self._completed.get(_flat_key(key)) if self._completed else None
        if data is None:
            return False
        requests_in = self.stats.requests_in
        requests_in[key[-1]] = requests_in.get(key[-1], 0) + 1
        self.stats.retransmissions_absorbed += 1
        self.send(data, peer)
        return True

    def answer_recognised(self, method: str, status: int, data: bytes, peer: Peer, arrived: float) -> None:
        """Count a new request :meth:`recognised` and send its final response, statelessly (RFC 3261
        §8.2.7): nothing is kept for Timer J, so a retransmission of it is a request like any other, which
        the application answers again from its state. At 20,000 answers/s a Timer J table would hold 640,000
        of them (~400 MB); without it, p99 at 16,000/s under Poisson arrivals fell from 2.3 to 0.5 ms."""
        stats = self.stats
        stats.requests_in[method] = stats.requests_in.get(method, 0) + 1
        key = (method, status)
        stats.responses_out[key] = stats.responses_out.get(key, 0) + 1
        if method == "REGISTER":
            outcome = "absorbed" if status < 300 else "refused"
            stats.register_latency[outcome].observe(self._clock() - arrived)
        self.send(data, peer)

    def new_tag(self) -> str:
        """A fresh To tag or branch token (48 random bits)."""
        return self._unique()

    # ------------------------------------------------------------------------------------ requests

    def _receive_request(self, request: Request, peer: Peer, data: bytes) -> None:
        method = request.method
        self.stats.requests_in[method] = self.stats.requests_in.get(method, 0) + 1
        via = _stamp_received(request, peer)
        try:
            key = server_key(request, via)
        except ParseError as exc:
            self._stateless_reply(request, peer, exc.status, exc.reason)
            return
        if method == "CANCEL":
            self._receive_cancel(request, peer, key)
            return
        txn = self._servers.get(key)
        if txn is not None and (method != "ACK" or txn.last_status >= 300):
            self.stats.retransmissions_absorbed += 1
            txn.on_retransmission(request)
            return
        if method == "ACK":
            self._events.append(StrayAck(request, peer))
            return
        if txn is None and self._completed and self._resend_completed(key, via, peer):
            return
        txn = (InviteServer if method == "INVITE" else NonInviteServer)(self, self.timers, request, peer, key)
        txn.reply_to = response_peer(via, peer)
        txn.arrived = self._now
        self._servers[key] = txn
        if request.headers.get("max-forwards") == "0" and method != "OPTIONS":
            self.respond(txn, make_response(request, 483))
            return
        if is_loop(request, self._local_vias):
            self.stats.loops += 1
            self.respond(txn, make_response(request, 482))
            return
        if method == "INVITE":
            self.respond(txn, make_response(request, 100))
        self._events.append(IncomingRequest(txn, request, peer, data))

    def _receive_cancel(self, request: Request, peer: Peer, key: ServerKey) -> None:
        own = self._servers.get(key)
        if own is not None:  # a retransmitted CANCEL
            own.on_retransmission(request)
            return
        if self._completed and self._resend_completed(key, request.top_via, peer):
            return
        txn = NonInviteServer(self, self.timers, request, peer, key)
        self._servers[key] = txn
        invite = self._servers.get((*key[:-1], "INVITE"))
        if invite is None or invite.state is State.TERMINATED:
            self.respond(txn, make_response(request, 481))
            return
        self.respond(txn, make_response(request, 200, to_tag=invite.to_tag))
        ctx = self._ctx_of_server.get(id(invite))
        if ctx is None:
            # Not proxied (yet): answer the INVITE ourselves.
            if invite.last_status < 200:
                self.respond(invite, make_response(invite.request, 487, to_tag=invite.to_tag))
            return
        for branch in ctx.branches:
            self._cancel_branch(branch)

    def _stateless_reply(self, request: Request, peer: Peer, status: int, reason: str | None = None) -> None:
        if request.method == "ACK":
            return
        response = make_response(request, status, to_tag=self._unique())
        if reason:
            response.headers.add("Warning", f'399 midregistrar "{_quote(reason)}"')
        self._send_response(response, response_peer(request.top_via, peer), request.method)

    def _reject_unparsable(self, data: bytes, peer: Peer, exc: ParseError) -> None:
        """Answer 400 (or 505/513) when a reply can be routed; otherwise drop silently."""
        request = exc.message
        if not exc.can_reply or not isinstance(request, Request) or request.method == "ACK":
            return
        try:
            via = parse_via_sent_by(request.headers.values("via")[0])
        except (ParseError, IndexError):
            return
        response = Response(exc.status, "", _reply_headers(request))
        if exc.status == 400:
            response.reason = f"Bad Request ({exc.reason})"
        to = response.headers.get("to")
        if to is not None and "tag=" not in to:
            response.headers.set("To", f"{to};tag={self._unique()}")
        self._send_response(response, response_peer(via, peer), request.method)

    # ------------------------------------------------------------------------------------ responses

    def _receive_response(self, response: Response) -> None:
        txn = self._clients.get(client_key(response))
        if txn is not None:
            txn.on_response(response)
            return
        # Not ours to match: a 2xx retransmission for an INVITE whose client transaction ended.
        vias = response.vias
        if len(vias) >= 2 and (vias[0].host.lower(), vias[0].port or 5060) in self._local_vias:
            upstream = strip_top_via(response)
            self._send_response(upstream, _via_peer(upstream.top_via), upstream.cseq.method)

    def _send_response(self, response: Response, peer: Peer, method: str) -> None:
        key = (method, response.status)
        self.stats.responses_out[key] = self.stats.responses_out.get(key, 0) + 1
        self.send(response.to_bytes(stream=peer.reliable), peer)

    # ------------------------------------------------------------------------------------ commands

    def respond(self, txn: ServerTransaction, response: Response, *, relayed: bool = False) -> None:
        """Send a response on a server transaction (adds a To tag to locally built final responses).
        ``relayed``: the final answer of the next hop, passed on (:meth:`finish`)."""
        status = response.status
        if status > 100:
            headers = response.headers
            to = headers.first("to")
            value = "" if to is None else to.value
            if "tag=" not in value:
                tag = txn.to_tag
                if tag is None:
                    tag = txn.to_tag = self._unique()
                if to is None:
                    headers.set("To", f";tag={tag}")
                else:  # one To line: the request's was checked single at parse time
                    headers.replace(to, Header(to.name, f"{value};tag={tag}", None, "to"))
        if txn.answered and not (txn.invite and 200 <= status < 300):
            return  # a late answer (e.g. after a timeout already answered 408): nothing more to send
        stats = self.stats
        method = txn.key[-1]
        key = (method, status)
        stats.responses_out[key] = stats.responses_out.get(key, 0) + 1
        if relayed:
            stats.relayed_answers[key] = stats.relayed_answers.get(key, 0) + 1
        if method == "REGISTER" and status >= 200:
            outcome = "relayed" if relayed else "absorbed" if status < 300 else "refused"
            stats.register_latency[outcome].observe(self._clock() - txn.arrived)
        reply_to = txn.reply_to
        txn.send_response(response, reply_to or response_peer(txn.request.top_via, txn.peer))

    def proxy(
        self,
        txn: ServerTransaction,
        targets: list[tuple[Request | URI | None, Peer]],
        *,
        hold_final: bool = False,
        flows: Sequence[bool] = (),
    ) -> ResponseContext:
        """Forward a request on one branch per target, in parallel (§16.5–16.6).

        A target is (request to send, or just the new Request-URI, or None to keep it; next-hop peer). A
        full request is used as the branch copy's base (the mid-registrar's rewritten REGISTER).
        ``flows[i]`` marks a branch sent over a phone's own flow (a connection it opened, or a NATed
        address): it is record-routed with the flow's token whatever ``record_route`` says (RFC 5626 §5.3).
        """
        ctx = ResponseContext(txn, txn.request, txn.peer, hold_final=hold_final)
        self._ctx_of_server[id(txn)] = ctx
        for i, (target, peer) in enumerate(targets):
            base = target if isinstance(target, Request) else txn.request
            uri = None if isinstance(target, Request) or target is None else target
            peer, local = self._bound(peer)
            branch = make_branch(txn.request, self._unique())
            via = Via(local.transport.upper(), local.host, local.port, (("branch", branch), ("rport", None)))
            if i < len(flows) and flows[i]:
                rr: str | tuple[str, ...] | None = self._flow_record_route(
                    self.local_for(txn.peer), local, peer
                )
            else:
                rr = f"<sip:{local.hostport};lr>" if self.record_route else None
            copy = forward_copy(base, uri=uri, via=via, record_route=rr, drop_top_route=False)
            client = self._client(copy, peer)
            self._ctx_of_client[id(client)] = ctx
            ctx.branches.append(Branch(client, peer))
            client.start()
        if not targets:
            self.respond(txn, make_response(txn.request, 480))
            self._finished(ctx)
        return ctx

    @staticmethod
    def _flow_record_route(arrived: LocalAddress, local: LocalAddress, peer: Peer) -> str | tuple[str, ...]:
        """Record-Route for a branch over a phone's flow: our address with the flow's token, so both ends
        send in-dialog requests here and we send them on over the flow. When the request came in on another
        socket or transport than the flow's (main on UDP, the phone on TLS or WebSocket), two entries
        (RFC 5658): the lower one faces the caller with the address it reached us on, the top one faces the
        phone; each end then reaches us on a transport it speaks, and both carry the token."""
        token = flow_token(peer)
        phone_side = f"<sip:{token}@{local.hostport}{uri_transport(peer.transport)};lr>"
        if (arrived.hostport, arrived.transport) == (local.hostport, peer.transport):
            return phone_side
        return f"<sip:{token}@{arrived.hostport}{uri_transport(arrived.transport)};lr>", phone_side

    def _finished(self, ctx: ResponseContext) -> None:
        """The final response went upstream: a CANCEL has nothing left to cancel, so the server side no
        longer needs the context (its branches keep it until their own transactions end)."""
        ctx.finished = True
        self._ctx_of_server.pop(id(ctx.server), None)
        for branch in ctx.branches:
            if branch.done:  # answered branches route nothing more to the context
                self._ctx_of_client.pop(id(branch.txn), None)

    def finish(self, ctx: ResponseContext, response: Response) -> None:
        """Send the (possibly rewritten) held final response upstream."""
        if ctx.finished:
            return
        self._finished(ctx)
        self.respond(ctx.server, response, relayed=True)

    def send_request(self, request: Request, peer: Peer) -> int:
        """Originate a request (a generated De-REGISTER, a keep-alive OPTIONS). Returns a handle that comes
        back in a :class:`ClientResult`."""
        peer, local = self._bound(peer)
        via = Via(local.transport.upper(), local.host, local.port, (("branch", f"z9hG4bK-{self._unique()}"),))
        request.headers.prepend("Via", str(via))
        if "max-forwards" not in request.headers:
            request.headers.add("Max-Forwards", "70")
        client = self._client(request, peer)
        handle = next(self._handle_seq)
        self._handles[id(client)] = handle
        client.start()
        return handle

    def forward_stateless(self, request: Request, peer: Peer) -> None:
        """Send a request on without a transaction (an ACK for a 2xx, §16.11)."""
        peer, local = self._bound(peer)
        via = Via(local.transport.upper(), local.host, local.port, (("branch", make_branch(request, "ack")),))
        copy = forward_copy(request, uri=None, via=via)
        self.send(copy.to_bytes(stream=peer.reliable), peer)

    def _client(self, request: Request, peer: Peer) -> ClientTransaction:
        """A new client transaction for ``request``, known to the stack; the caller starts it once it has
        recorded what the responses belong to."""
        client = (InviteClient if request.method == "INVITE" else NonInviteClient)(
            self, self.timers, request, peer
        )
        self._clients[client.key] = client
        if peer.reliable:
            self._reliable_clients.add(client)
        return client

    def local_for(self, peer: Peer) -> LocalAddress:
        """The local address a message to ``peer`` leaves from, as Via and Record-Route write it."""
        return self.locals[self.local_index(peer)]

    def local_index(self, peer: Peer) -> int:
        """The listen socket a message to ``peer`` leaves from: the one ``peer.local`` names (where its
        request came in) when its transport and IP family fit, else the first of the peer's transport and
        family (a dual-stack process listens on one of each), else the first of its transport."""
        locals_ = self.locals
        family = ip_family(peer.host)
        i = peer.local
        if i < len(locals_) and locals_[i].transport == peer.transport and _fits(locals_[i].host, family):
            return i
        fallback = None
        for j, address in enumerate(locals_):
            if address.transport == peer.transport:
                if _fits(address.host, family):
                    return j
                if fallback is None:
                    fallback = j
        return fallback if fallback is not None else 0

    def _bound(self, peer: Peer) -> tuple[Peer, LocalAddress]:
        """``peer`` and the local address a message to it leaves from. A UDP peer is given that socket (dual
        stack: an IPv6 main registrar or phone is reached from the IPv6 socket, whatever socket the request
        being forwarded came in on); a stream peer is reached over its connection, whichever socket
        accepted it."""
        i = self.local_index(peer)
        if not peer.reliable and peer.local != i:
            peer = replace(peer, local=i)
        return peer, self.locals[i]

    def is_local_uri(self, uri: URI) -> bool:
        if not isinstance(uri, SipURI):
            return False
        return (uri.host.lower(), uri.port or 5060) in self._local_vias

    def pop_own_routes(self, request: Request) -> list[str]:
        """Remove the Route entries at the top that name this process (RFC 3261 §16.4: a phone that uses it
        as outbound proxy routes through it) and return the Route values left. A Route that does not parse
        is left for the next hop to judge."""
        routes = request.headers.values("route")
        while routes:
            try:
                ours = self.is_local_uri(parse_address(routes[0], "Route").uri)
            except ParseError:
                break
            if not ours:
                break
            request.headers.pop_first_value("route")
            routes = routes[1:]
        return routes

    # ------------------------------------------------------------------------------------ proxy internals

    def _proxy_response(self, ctx: ResponseContext, txn: ClientTransaction, response: Response) -> None:
        branch = ctx.branch_for(txn)
        if branch is None:
            return
        if len(response.vias) < 2:
            return  # nothing left to route it by once our Via is gone: never forwarded (§16.7 step 3)
        status = response.status
        if status < 200:
            if branch.cancel_wanted and not branch.cancelled:
                self._cancel_branch(branch)
            if status > 100 and not ctx.finished and ctx.server.last_status < 200:
                self._relay_upstream(ctx, response)
            return
        ctx.record_final(branch, response)
        if 200 <= status < 300:
            if ctx.invite:
                # Every 2xx to an INVITE goes upstream at once; the others are cancelled.
                self._relay_upstream(ctx, response, force=True)
                for other in ctx.branches:
                    if other is not branch:
                        self._cancel_branch(other)
                self._finished(ctx)
                return
        elif status >= 600 and ctx.invite:
            for other in ctx.branches:
                if other is not branch:
                    self._cancel_branch(other)
        if ctx.finished:
            return
        if 200 <= status < 300 or ctx.all_done():
            final = response if 200 <= status < 300 else ctx.choose()
            upstream = strip_top_via(final)
            if ctx.hold_final:
                self._events.append(ProxyFinal(ctx, upstream))
            else:
                self._finished(ctx)
                self.respond(ctx.server, upstream)

    def _relay_upstream(self, ctx: ResponseContext, response: Response, *, force: bool = False) -> None:
        upstream = strip_top_via(response)
        if force and ctx.server.state is State.ACCEPTED:
            ctx.server.send_response(upstream, response_peer(ctx.server.request.top_via, ctx.server.peer))
            return
        self.respond(ctx.server, upstream)

    def _cancel_branch(self, branch: Branch) -> None:
        if branch.done or branch.cancelled or branch.txn.request.method != "INVITE":
            return
        if not branch.txn.provisional_seen:
            branch.cancel_wanted = True  # §9.1: wait for a provisional response before cancelling
            return
        branch.cancelled = True
        self._client(build_cancel(branch.txn.request), branch.target).start()


def _stamp_received(request: Request, peer: Peer) -> Via:
    """Add received/rport to the top Via as RFC 3261 §18.2.1 and RFC 3581 ask; return that Via."""
    first = request.headers.first("via")
    if first is None:
        raise ParseError("missing Via")
    vias = first.parsed(parse_via_list)
    if not vias:
        raise ParseError("missing Via")
    via = vias[0]
    rport: str | None = None
    for name, value in via.params:
        if name.lower() == "rport":
            rport = "" if value is None else value
            break
    if rport == "":
        params = _stamped_params(via.params, str(peer.port), peer.host)
    elif via.host.strip("[]") != peer.host:
        params = _stamped_params(via.params, None, peer.host)
    else:
        return via
    stamped = Via(via.transport, via.host, via.port, params, via.protocol)
    text = str(stamped)
    if len(vias) == 1:
        header = typed_header(first.name, text, parse_via_list, [stamped])
    else:
        value = ", ".join([text, *split_commas(first.value)[1:]])
        header = typed_header(first.name, value, parse_via_list, [stamped, *vias[1:]])
    request.headers.replace(first, header)
    return stamped


def _stamped_params(params: Params, rport: str | None, received: str) -> Params:
    """``params`` with rport set (unless None) and received set in place or appended: set_param twice."""
    out: list[tuple[str, str | None]] = []
    have_received = False
    for name, value in params:
        lname = name.lower()
        if lname == "received":
            out.append((name, received))
            have_received = True
        elif rport is not None and lname == "rport":
            out.append((name, rport))
        else:
            out.append((name, value))
    if not have_received:
        out.append(("received", received))
    return tuple(out)


def _flat_key(key: ServerKey) -> str:
    return "\x00".join(key)


def _via_peer(via: Via) -> Peer:
    return response_peer(via, Peer(via.transport.lower(), via.host, via.port or 5060))


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _reply_headers(request: Request) -> Headers:
    items = [h for h in request.headers if h.key in _REPLY_KEYS]
    items.append(Header("Content-Length", "0"))
    return Headers(items)


_REPLY_KEYS = frozenset({"via", "from", "to", "call-id", "cseq"})
