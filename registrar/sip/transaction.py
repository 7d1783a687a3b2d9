"""RFC 3261 §17 transactions as plain state machines.

A transaction never touches a socket or a clock: it is told the time, and it writes what it wants done
(send these bytes to that peer, arm this timer, hand this response up) into its :class:`Outbox`. The stack
owns the transactions, drains the outbox and fires timers when their deadline passes.

Timers (seconds, from :class:`Timers`): A/E retransmit client requests over UDP (T1 doubling; E capped at
T2), B/F time a client transaction out (64·T1), D (32 s) and K (T4) absorb response retransmissions at
the client, G retransmits a final INVITE response over UDP, H (64·T1) waits for its ACK, I (T4) absorbs ACK
retransmissions, J (64·T1) absorbs request retransmissions at a non-INVITE server. Unreliable transports
only get retransmissions and the wait states; over TCP those timers are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from registrar.sip.errors import ParseError
from registrar.sip.headers import MAGIC_COOKIE, Via
from registrar.sip.message import Header, Headers, Request, Response, make_response
from registrar.sip.transport import Peer


@dataclass(frozen=True, slots=True)
class Timers:
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    @property
    def b(self) -> float:
        return 64 * self.t1


class State(Enum):
    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"
    TERMINATED = "terminated"


class Outbox(Protocol):
    """What a transaction can ask of its stack."""

    def send(self, data: bytes, peer: Peer) -> None: ...

    def arm(self, txn: Transaction, name: str, delay: float) -> None: ...

    def disarm(self, txn: Transaction, name: str) -> None: ...

    def response_in(self, txn: ClientTransaction, response: Response) -> None: ...

    def timed_out(self, txn: ClientTransaction) -> None: ...

    def terminated(self, txn: Transaction) -> None: ...

    def completed(self, txn: ServerTransaction, data: bytes, peer: Peer, linger: float) -> None: ...


ServerKey = tuple[str, ...]
ClientKey = tuple[str, str]


def server_key(request: Request, via: Via | None = None) -> ServerKey:
    """Server transaction key (RFC 3261 §17.2.3, with the RFC 2543 fallback). ACK maps to its INVITE.
    ``via``: the request's top Via when the caller has it at hand."""
    if via is None:
        via = request.top_via
    method = "INVITE" if request.method == "ACK" else request.method
    branch = via.branch or ""
    if branch.startswith(MAGIC_COOKIE):
        return (branch, via.host.lower(), str(via.port or ""), method)
    # RFC 2543: Request-URI, From tag, Call-ID, CSeq number, top Via (the To tag differs on the ACK).
    return (
        "2543",
        request.uri_text,
        request.from_.tag or "",
        request.call_id,
        str(request.cseq.seq),
        str(via),
        method,
    )


def client_key(response: Response) -> ClientKey:
    """Client transaction key of a response: our branch and the CSeq method (RFC 3261 §17.1.3)."""
    return (response.top_via.branch or "", response.cseq.method)


class Transaction:
    """Common state of all four machines."""

    __slots__ = ("outbox", "peer", "state", "timers")

    def __init__(self, outbox: Outbox, timers: Timers, peer: Peer) -> None:
        self.outbox = outbox
        self.timers = timers
        self.peer = peer
        self.state = State.TRYING

    @property
    def reliable(self) -> bool:
        return self.peer.reliable

    def on_timer(self, name: str, now: float) -> None:
        raise NotImplementedError

    def _terminate(self) -> None:
        if self.state is not State.TERMINATED:
            self.state = State.TERMINATED
            self.outbox.terminated(self)


# ---------------------------------------------------------------------------------------------- server


class ServerTransaction(Transaction):
    """INVITE (§17.2.1, with RFC 6026's Accepted state) and non-INVITE (§17.2.2) server transactions."""

    __slots__ = (
        "_g_interval",
        "_request",
        "invite",
        "key",
        "last_response",
        "last_status",
        "reply_to",
        "response_peer",
        "to_tag",
    )

    def __init__(self, outbox: Outbox, timers: Timers, request: Request, peer: Peer, key: ServerKey) -> None:
        # Transaction.__init__ inlined: one is built for every request that arrives.
        self.outbox = outbox
        self.timers = timers
        self.peer = peer
        self._request: Request | None = request
        self.key = key
        self.invite = request.method == "INVITE"
        self.state = State.PROCEEDING if self.invite else State.TRYING
        self.last_response: bytes | None = None
        self.last_status = 0
        self.response_peer = peer
        self.reply_to: Peer | None = None  # where responses go, when the stack worked it out on arrival
        self.to_tag: str | None = None
        self._g_interval = timers.t1

    @property
    def request(self) -> Request:
        """The request this transaction serves; released once a non-INVITE is answered (see below)."""
        if self._request is None:
            raise RuntimeError("the request of a completed non-INVITE server transaction was released")
        return self._request

    @property
    def answered(self) -> bool:
        """A final response was sent: the transaction only absorbs retransmissions from now on."""
        return self.state in (State.COMPLETED, State.CONFIRMED, State.TERMINATED, State.ACCEPTED)

    def send_response(self, response: Response, peer: Peer) -> None:
        """The TU answers. Provisional responses keep the transaction open; finals move it on."""
        if self.state in (State.COMPLETED, State.CONFIRMED, State.TERMINATED):
            return
        if self.state is State.ACCEPTED:
            if 200 <= response.status < 300:  # 2xx retransmissions from the TU go through
                self.outbox.send(response.to_bytes(stream=peer.reliable), peer)
            return
        data = response.to_bytes(stream=peer.reliable)
        self.last_response = data
        self.last_status = response.status
        self.response_peer = peer
        self.outbox.send(data, peer)
        if response.status < 200:
            if self.state is State.TRYING:
                self.state = State.PROCEEDING
            return
        if self.invite:
            if response.status < 300:
                # RFC 6026: absorb INVITE retransmissions for 64*T1, pass 2xx retransmissions.
                self.state = State.ACCEPTED
                self.outbox.arm(self, "L", self.timers.b)
            else:
                self.state = State.COMPLETED
                if not self.reliable:
                    self.outbox.arm(self, "G", self._g_interval)
                self.outbox.arm(self, "H", self.timers.b)
        else:
            self.state = State.COMPLETED
            # Timer J keeps this transaction for 32 s to absorb retransmissions with the bytes of the last
            # response: the stack keeps just those bytes and where they went (no object for the cyclic GC
            # to walk), and this object and its parsed request are freed.
            self._request = None
            self.outbox.completed(self, data, peer, 0 if self.reliable else self.timers.b)

    def on_retransmission(self, request: Request) -> None:
        """The same request again (or the ACK of a non-2xx final)."""
        if request.method == "ACK":
            if self.state is State.COMPLETED:
                self.state = State.CONFIRMED
                self.outbox.disarm(self, "G")
                self.outbox.disarm(self, "H")
                self.outbox.arm(self, "I", 0 if self.reliable else self.timers.t4)
            return
        if self.state in (State.PROCEEDING, State.COMPLETED) and self.last_response is not None:
            self.outbox.send(self.last_response, self.response_peer)

    def on_timer(self, name: str, now: float) -> None:
        if name == "G" and self.state is State.COMPLETED and self.last_response is not None:
            self.outbox.send(self.last_response, self.response_peer)
            self._g_interval = min(2 * self._g_interval, self.timers.t2)
            self.outbox.arm(self, "G", self._g_interval)
        elif name == "H" and self.state is State.COMPLETED:
            self.outbox.disarm(self, "G")
            self._terminate()
        elif (name == "I" and self.state is State.CONFIRMED) or (
            name in ("J", "L") and self.state in (State.COMPLETED, State.ACCEPTED)
        ):
            self._terminate()

    def on_transport_error(self) -> None:
        self._terminate()


# ---------------------------------------------------------------------------------------------- client


class ClientTransaction(Transaction):
    """INVITE (§17.1.1) and non-INVITE (§17.1.2) client transactions."""

    __slots__ = (
        "_ack",
        "_interval",
        "_request",
        "branch",
        "data",
        "final",
        "invite",
        "key",
        "provisional_seen",
    )

    def __init__(self, outbox: Outbox, timers: Timers, request: Request, peer: Peer) -> None:
        super().__init__(outbox, timers, peer)
        self._request: Request | None = request
        self.invite = request.method == "INVITE"
        self.branch = request.top_via.branch or ""
        self.key: ClientKey = (self.branch, request.method)
        self.state = State.CALLING if self.invite else State.TRYING
        self.data = request.to_bytes(stream=peer.reliable)
        self._interval = timers.t1
        self.final: Response | None = None
        self.provisional_seen = False
        self._ack: bytes | None = None

    @property
    def request(self) -> Request:
        """The request sent; released once a non-INVITE has its final response (Timer K needs none of it)."""
        if self._request is None:
            raise RuntimeError("the request of a completed non-INVITE client transaction was released")
        return self._request

    def start(self) -> None:
        self.outbox.send(self.data, self.peer)
        if not self.reliable:
            self.outbox.arm(self, "A" if self.invite else "E", self._interval)
        self.outbox.arm(self, "B" if self.invite else "F", self.timers.b)

    def on_response(self, response: Response) -> None:
        status = response.status
        if self.state is State.COMPLETED:
            if self.invite and status >= 300 and self._ack is not None:
                self.outbox.send(self._ack, self.peer)  # retransmitted final: resend our ACK
            return
        if self.state is State.TERMINATED:
            return
        if status < 200:
            self.provisional_seen = True
            if self.state in (State.CALLING, State.TRYING):
                self.state = State.PROCEEDING
                if self.invite:
                    self.outbox.disarm(self, "A")
            self.outbox.response_in(self, response)
            return
        self.final = response
        self.outbox.disarm(self, "A" if self.invite else "E")
        self.outbox.disarm(self, "B" if self.invite else "F")
        if self.invite and status < 300:
            self.outbox.response_in(self, response)
            self._terminate()
            return
        if self.invite:
            self._ack = build_ack(self.request, response).to_bytes(stream=self.reliable)
            self.outbox.send(self._ack, self.peer)
            self.state = State.COMPLETED
            self.outbox.response_in(self, response)
            self.outbox.arm(self, "D", 0 if self.reliable else 32.0)
        else:
            self.state = State.COMPLETED
            self.outbox.response_in(self, response)
            self._request, self.final = None, None  # only response retransmissions to absorb now
            self.outbox.arm(self, "K", 0 if self.reliable else self.timers.t4)

    def on_timer(self, name: str, now: float) -> None:
        if name in ("A", "E") and self.state in (State.CALLING, State.TRYING, State.PROCEEDING):
            if name == "A" and self.state is not State.CALLING:
                return
            self.outbox.send(self.data, self.peer)
            if name == "A":
                self._interval *= 2
            else:
                # In Proceeding, E fires every T2 (§17.1.2.2).
                base = (
                    self.timers.t2
                    if self.state is State.PROCEEDING
                    else min(2 * self._interval, self.timers.t2)
                )
                self._interval = base
            self.outbox.arm(self, name, self._interval)
        elif name in ("B", "F") and self.state in (State.CALLING, State.TRYING, State.PROCEEDING):
            self.outbox.disarm(self, "A" if self.invite else "E")
            self.state = State.TERMINATED
            self.outbox.timed_out(self)
            self.outbox.terminated(self)
        elif name in ("D", "K") and self.state is State.COMPLETED:
            self._terminate()

    def on_transport_error(self) -> None:
        if self.state in (State.CALLING, State.TRYING, State.PROCEEDING):
            self.outbox.disarm(self, "A" if self.invite else "E")
            self.outbox.disarm(self, "B" if self.invite else "F")
            self.state = State.TERMINATED
            self.outbox.timed_out(self)
            self.outbox.terminated(self)


def build_ack(invite: Request, response: Response) -> Request:
    """The ACK a client transaction sends for a non-2xx final response (RFC 3261 §17.1.1.3)."""
    items: list[Header] = []
    top_via = invite.headers.values("via")[0]
    items.append(Header("Via", top_via))
    for h in invite.headers:
        if h.key in ("from", "call-id", "route", "max-forwards"):
            items.append(h)
    to_value = response.headers.get("to")
    if to_value is None:
        raise ParseError("response without To")
    items.insert(2, Header("To", to_value))
    items.append(Header("CSeq", f"{invite.cseq.seq} ACK"))
    items.append(Header("Content-Length", "0"))
    return Request("ACK", invite.uri, Headers(items))


def timeout_response(request: Request) -> Response:
    """The 408 a client transaction's timeout stands for (RFC 3261 §16.7 step 2 / §8.1.3.1)."""
    return make_response(request, 408)
