"""RFC 3261 §17 transactions: one class per state machine of figures 5–8 (and RFC 6026's Accepted state).

A transaction never touches a socket or a clock: it writes what it wants done (send these bytes to that
peer, arm this timer, hand this response up) into its :class:`Outbox`. The stack owns the transactions,
drains the outbox, fires timers when their deadline passes and reports transport errors.

Each machine has one method per input of its figure (a response from the network, a request
retransmission, a response from the TU, a timer, a transport error); inside, one branch per state, in the
figure's order. Unreliable transports get the retransmission timers and the wait states; over TCP the wait
timers are zero (§17.1.1.2, §17.1.2.2, §17.2.1, §17.2.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import ClassVar, Protocol

from registrar.sip.errors import ParseError
from registrar.sip.headers import MAGIC_COOKIE, Via
from registrar.sip.message import Header, Headers, Request, Response
from registrar.sip.transport import Peer


@dataclass(frozen=True, slots=True)
class Timers:
    """The base intervals of RFC 3261 table 4, in seconds."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    @property
    def timeout(self) -> float:
        """64·T1: Timers B, F, H, J and L."""
        return 64 * self.t1


# Timer D is "at least 32 s" over an unreliable transport, whatever T1 is (§17.1.1.2).
TIMER_D = 32.0


class Timer(StrEnum):
    """The timers of RFC 3261 table 4 (and RFC 6026's L), named by their letter.

    A StrEnum: the stack keys its live-timer table by timer, and str hashing runs in C.
    """

    A = "A"  # INVITE client, unreliable: retransmit the INVITE; T1, doubling
    B = "B"  # INVITE client: no final response; 64·T1
    D = "D"  # INVITE client after a non-2xx final: absorb its retransmissions; 32 s unreliable, else 0
    E = "E"  # non-INVITE client, unreliable: retransmit; T1 doubling up to T2, T2 once Proceeding
    F = "F"  # non-INVITE client: no final response; 64·T1
    G = "G"  # INVITE server, unreliable: retransmit the non-2xx final; T1 doubling up to T2
    H = "H"  # INVITE server: no ACK for the non-2xx final; 64·T1
    I = "I"  # INVITE server after the ACK: absorb ACK retransmissions; T4 unreliable, else 0  # noqa: E741
    J = "J"  # non-INVITE server after its final: absorb request retransmissions; 64·T1 unreliable, else 0
    K = "K"  # non-INVITE client after its final: absorb response retransmissions; T4 unreliable, else 0
    L = "L"  # INVITE server after a 2xx (RFC 6026 Accepted): absorb INVITE retransmissions; 64·T1


class State(Enum):
    """The states of figures 5–8, with RFC 6026's Accepted; each machine uses its own figure's subset."""

    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"
    TERMINATED = "terminated"


# Statuses a client transaction reports when no response came: Timer B/F (§17.1.1.2, §17.1.2.2; §8.1.3.1
# says the TU treats it as 408) and a transport error (§17.1.4, §8.1.3.1: treated as 503).
TIMEOUT = 408
TRANSPORT_ERROR = 503


class Timed(Protocol):
    """A machine with timers: the stack calls back when one it armed fires."""

    def on_timer(self, timer: Timer) -> None: ...


class Outbox(Protocol):
    """What a transaction can ask of its stack."""

    def send(self, data: bytes, peer: Peer) -> None: ...

    def arm(self, txn: Timed, timer: Timer, delay: float) -> None: ...

    def disarm(self, txn: Timed, timer: Timer) -> None: ...

    def response_in(self, txn: ClientTransaction, response: Response) -> None: ...

    def failed(self, txn: ClientTransaction, status: int) -> None: ...

    def terminated(self, txn: ServerTransaction | ClientTransaction) -> None: ...

    def completed(self, txn: NonInviteServer, data: bytes, peer: Peer, timer_j: float) -> None: ...


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
    """What the four machines share: the stack, the timer values, the peer and the current state."""

    __slots__ = ("outbox", "peer", "state", "timers")

    outbox: Outbox
    timers: Timers
    peer: Peer
    state: State

    @property
    def reliable(self) -> bool:
        return self.peer.reliable


# ---------------------------------------------------------------------------------------------- server


class _Server(Transaction):
    """What both server machines share: the request served and the last response sent on it.

    Transport errors on responses are not reported to server transactions: a response that cannot be sent
    is lost like a dropped datagram, and Timer H or J (or the peer's next retransmission) ends the
    transaction.
    """

    __slots__ = (
        "_request",
        "arrived",
        "key",
        "last_response",
        "last_status",
        "reply_to",
        "response_peer",
        "to_tag",
    )

    invite: ClassVar[bool]
    initial: ClassVar[State]

    def __init__(self, outbox: Outbox, timers: Timers, request: Request, peer: Peer, key: ServerKey) -> None:
        # One is built for every request that arrives: a single __init__, no super() chain.
        self.outbox = outbox
        self.timers = timers
        self.peer = peer
        self.state = self.initial
        self._request: Request | None = request
        self.key = key
        self.last_response: bytes | None = None
        self.last_status = 0
        self.response_peer = peer
        self.reply_to: Peer | None = None  # where responses go, when the stack worked it out on arrival
        self.to_tag: str | None = None
        self.arrived = 0.0  # wall-clock time the request arrived (the stack sets it): answer latency

    @property
    def request(self) -> Request:
        """The request this transaction serves; released once a non-INVITE is answered (see below)."""
        if self._request is None:
            raise RuntimeError("the request of a completed non-INVITE server transaction was released")
        return self._request

    @property
    def answered(self) -> bool:
        """A final response was sent: the transaction only absorbs retransmissions from now on."""
        return self.state in _ANSWERED

    def _send(self, response: Response, peer: Peer) -> bytes:
        """Send a response from the TU and remember it for retransmitted requests."""
        data = response.to_bytes(stream=peer.reliable)
        self.last_response = data
        self.last_status = response.status
        self.response_peer = peer
        self.outbox.send(data, peer)
        return data


_ANSWERED = frozenset({State.COMPLETED, State.CONFIRMED, State.ACCEPTED, State.TERMINATED})


class InviteServer(_Server):
    """INVITE server transaction: RFC 3261 figure 7 with RFC 6026's Accepted state (figure 5 there).

    ========== ========================= ============================================ ==========
    state      input                     action                                       next
    ========== ========================= ============================================ ==========
    (start)    INVITE                    pass it up (the stack sends 100 Trying)      Proceeding
    Proceeding 1xx from TU               send it                                      Proceeding
    Proceeding INVITE                    resend the last provisional                  Proceeding
    Proceeding 2xx from TU               send it, arm L                               Accepted
    Proceeding 300-699 from TU           send it, arm G (unreliable) and H            Completed
    Accepted   2xx from TU               send it                                      Accepted
    Accepted   INVITE                    absorb (the stack passes the ACK up)         Accepted
    Accepted   Timer L                                                                Terminated
    Completed  INVITE                    resend the final                             Completed
    Completed  Timer G                   resend the final, G doubled up to T2         Completed
    Completed  ACK                       disarm G and H, arm I                        Confirmed
    Completed  Timer H                   disarm G                                     Terminated
    Confirmed  Timer I                                                                Terminated
    ========== ========================= ============================================ ==========
    """

    __slots__ = ("_g_interval",)

    invite = True
    initial = State.PROCEEDING

    def send_response(self, response: Response, peer: Peer) -> None:
        """The TU answers."""
        status = response.status
        state = self.state
        if state is State.PROCEEDING:
            self._send(response, peer)
            if status < 200:
                return
            if status < 300:
                # RFC 6026: absorb INVITE retransmissions for 64·T1, let the TU's 2xx retransmissions through.
                self.state = State.ACCEPTED
                self.outbox.arm(self, Timer.L, self.timers.timeout)
                return
            self.state = State.COMPLETED
            if not self.reliable:
                self._g_interval = self.timers.t1
                self.outbox.arm(self, Timer.G, self._g_interval)
            self.outbox.arm(self, Timer.H, self.timers.timeout)
        elif state is State.ACCEPTED and 200 <= status < 300:
            self.outbox.send(response.to_bytes(stream=peer.reliable), peer)

    def on_retransmission(self, request: Request) -> None:
        """The INVITE again, or the ACK of a non-2xx final (the stack passes the ACK of a 2xx up)."""
        state = self.state
        if request.method == "ACK":
            if state is State.COMPLETED:
                self.state = State.CONFIRMED
                self.outbox.disarm(self, Timer.G)
                self.outbox.disarm(self, Timer.H)
                self.outbox.arm(self, Timer.I, 0 if self.reliable else self.timers.t4)
        elif (state is State.PROCEEDING or state is State.COMPLETED) and self.last_response is not None:
            self.outbox.send(self.last_response, self.response_peer)

    def on_timer(self, timer: Timer) -> None:
        state = self.state
        if state is State.COMPLETED:
            if timer is Timer.G and self.last_response is not None:
                self.outbox.send(self.last_response, self.response_peer)
                self._g_interval = min(2 * self._g_interval, self.timers.t2)
                self.outbox.arm(self, Timer.G, self._g_interval)
            elif timer is Timer.H:
                self.outbox.disarm(self, Timer.G)
                _terminate(self)
        elif (state is State.CONFIRMED and timer is Timer.I) or (
            state is State.ACCEPTED and timer is Timer.L
        ):
            _terminate(self)


class NonInviteServer(_Server):
    """Non-INVITE server transaction: RFC 3261 figure 8.

    ========== ========================= ============================================ ==========
    state      input                     action                                       next
    ========== ========================= ============================================ ==========
    (start)    request                   pass it up                                   Trying
    Trying     request                   absorb (nothing sent yet)                    Trying
    Trying     1xx from TU               send it                                      Proceeding
    Trying     200-699 from TU           send it, hand the bytes to the stack         Completed
    Proceeding 1xx from TU               send it                                      Proceeding
    Proceeding request                   resend the last provisional                  Proceeding
    Proceeding 200-699 from TU           send it, hand the bytes to the stack         Completed
    ========== ========================= ============================================ ==========

    Completed is kept by the stack, not by this object: for Timer J it needs only the response bytes and
    where they went, so this object and its parsed request are freed at once (see ``Stack.completed``);
    the stack resends those bytes for each retransmitted request and forgets them when J fires.
    """

    __slots__ = ()

    invite = False
    initial = State.TRYING

    def send_response(self, response: Response, peer: Peer) -> None:
        """The TU answers."""
        state = self.state
        if state is not State.TRYING and state is not State.PROCEEDING:
            return
        data = self._send(response, peer)
        if response.status < 200:
            self.state = State.PROCEEDING
            return
        self.state = State.COMPLETED
        self._request = None
        self.outbox.completed(self, data, peer, 0 if self.reliable else self.timers.timeout)

    def on_retransmission(self, request: Request) -> None:
        """The same request again, while this object still holds the transaction."""
        if self.state is State.PROCEEDING and self.last_response is not None:
            self.outbox.send(self.last_response, self.response_peer)


# ---------------------------------------------------------------------------------------------- client


class _Client(Transaction):
    """What both client machines share: the request (and its bytes, for retransmissions) and its key."""

    __slots__ = ("_interval", "_request", "branch", "data", "key", "provisional_seen")

    initial: ClassVar[State]

    def __init__(self, outbox: Outbox, timers: Timers, request: Request, peer: Peer) -> None:
        self.outbox = outbox
        self.timers = timers
        self.peer = peer
        self.state = self.initial
        self._request: Request | None = request
        self.branch = request.top_via.branch or ""
        self.key: ClientKey = (self.branch, request.method)
        self.data = request.to_bytes(stream=peer.reliable)
        self._interval = timers.t1
        self.provisional_seen = False

    @property
    def request(self) -> Request:
        """The request sent; released once a non-INVITE has its final response (Timer K needs none of it)."""
        if self._request is None:
            raise RuntimeError("the request of a completed non-INVITE client transaction was released")
        return self._request


class InviteClient(_Client):
    """INVITE client transaction: RFC 3261 figure 5.

    ========== ========================= ============================================ ==========
    state      input                     action                                       next
    ========== ========================= ============================================ ==========
    (start)    INVITE from the TU        send it, arm A (unreliable) and B            Calling
    Calling    Timer A                   resend the INVITE, A doubled                 Calling
    Calling    1xx                       disarm A, pass it up                         Proceeding
    Calling    2xx                       disarm A and B, pass it up                   Terminated
    Calling    300-699                   disarm A and B, send ACK, pass up, arm D     Completed
    Calling    Timer B                   disarm A, 408 to the TU                      Terminated
    Calling    transport error           disarm A and B, 503 to the TU                Terminated
    Proceeding 1xx                       pass it up                                   Proceeding
    Proceeding 2xx                       disarm B, pass it up                         Terminated
    Proceeding 300-699                   disarm B, send ACK, pass up, arm D           Completed
    Proceeding Timer B                   408 to the TU                                Terminated
    Proceeding transport error           disarm B, 503 to the TU                      Terminated
    Completed  300-699                   resend the ACK                               Completed
    Completed  transport error                                                        Terminated
    Completed  Timer D                                                                Terminated
    ========== ========================= ============================================ ==========

    Timer B stays armed in Proceeding (figure 5 disarms it there): a proxied INVITE that rings longer
    than 64·T1 gets 408, where a proxy's Timer C (§16.8) would allow three minutes.
    """

    __slots__ = ("_ack",)

    initial = State.CALLING

    def start(self) -> None:
        """Send the INVITE and arm the first timers."""
        self.outbox.send(self.data, self.peer)
        if not self.reliable:
            self.outbox.arm(self, Timer.A, self._interval)
        self.outbox.arm(self, Timer.B, self.timers.timeout)

    def on_response(self, response: Response) -> None:
        """A response matched this transaction (§17.1.3)."""
        status = response.status
        state = self.state
        if state is State.CALLING or state is State.PROCEEDING:
            if state is State.CALLING:
                self.outbox.disarm(self, Timer.A)  # A runs only while Calling
            if status < 200:
                self.provisional_seen = True
                self.state = State.PROCEEDING
                self.outbox.response_in(self, response)
                return
            self.outbox.disarm(self, Timer.B)
            if status < 300:
                self.outbox.response_in(self, response)
                _terminate(self)
                return
            self._ack: bytes = build_ack(self.request, response).to_bytes(stream=self.reliable)
            self.outbox.send(self._ack, self.peer)
            self.state = State.COMPLETED
            self.outbox.response_in(self, response)
            self.outbox.arm(self, Timer.D, 0 if self.reliable else TIMER_D)
        elif state is State.COMPLETED and status >= 300:
            self.outbox.send(self._ack, self.peer)  # a retransmitted final: resend our ACK

    def on_timer(self, timer: Timer) -> None:
        state = self.state
        if timer is Timer.A and state is State.CALLING:
            self.outbox.send(self.data, self.peer)
            self._interval *= 2
            self.outbox.arm(self, Timer.A, self._interval)
        elif timer is Timer.B and state is State.CALLING:
            _fail(self, TIMEOUT, Timer.A)
        elif timer is Timer.B and state is State.PROCEEDING:
            _fail(self, TIMEOUT)
        elif timer is Timer.D and state is State.COMPLETED:
            _terminate(self)

    def on_transport_error(self) -> None:
        """The request could not be delivered, or its connection was lost before a final response."""
        state = self.state
        if state is State.CALLING:
            _fail(self, TRANSPORT_ERROR, Timer.A, Timer.B)
        elif state is State.PROCEEDING:
            _fail(self, TRANSPORT_ERROR, Timer.B)
        elif state is State.COMPLETED:
            _terminate(self)


class NonInviteClient(_Client):
    """Non-INVITE client transaction: RFC 3261 figure 6.

    ========== ========================= ============================================ ==========
    state      input                     action                                       next
    ========== ========================= ============================================ ==========
    (start)    request from the TU       send it, arm E (unreliable) and F            Trying
    Trying     Timer E                   resend, E doubled up to T2                   Trying
    Trying     1xx                       pass it up                                   Proceeding
    Trying     200-699                   disarm E and F, pass it up, arm K            Completed
    Trying     Timer F                   disarm E, 408 to the TU                      Terminated
    Trying     transport error           disarm E and F, 503 to the TU                Terminated
    Proceeding Timer E                   resend, E set to T2                          Proceeding
    Proceeding 1xx                       pass it up                                   Proceeding
    Proceeding 200-699                   disarm E and F, pass it up, arm K            Completed
    Proceeding Timer F                   disarm E, 408 to the TU                      Terminated
    Proceeding transport error           disarm E and F, 503 to the TU                Terminated
    Completed  200-699                   absorb                                       Completed
    Completed  Timer K                                                                Terminated
    ========== ========================= ============================================ ==========

    In Completed only response retransmissions are left to absorb: the request is released.
    """

    __slots__ = ()

    initial = State.TRYING

    def start(self) -> None:
        """Send the request and arm the first timers."""
        self.outbox.send(self.data, self.peer)
        if not self.reliable:
            self.outbox.arm(self, Timer.E, self._interval)
        self.outbox.arm(self, Timer.F, self.timers.timeout)

    def on_response(self, response: Response) -> None:
        """A response matched this transaction (§17.1.3)."""
        state = self.state
        if state is not State.TRYING and state is not State.PROCEEDING:
            return
        if response.status < 200:
            self.provisional_seen = True
            self.state = State.PROCEEDING
            self.outbox.response_in(self, response)
            return
        self.outbox.disarm(self, Timer.E)
        self.outbox.disarm(self, Timer.F)
        self.state = State.COMPLETED
        self.outbox.response_in(self, response)
        self._request = None
        self.outbox.arm(self, Timer.K, 0 if self.reliable else self.timers.t4)

    def on_timer(self, timer: Timer) -> None:
        state = self.state
        if timer is Timer.E and (state is State.TRYING or state is State.PROCEEDING):
            self.outbox.send(self.data, self.peer)
            t2 = self.timers.t2
            self._interval = t2 if state is State.PROCEEDING else min(2 * self._interval, t2)
            self.outbox.arm(self, Timer.E, self._interval)
        elif timer is Timer.F and (state is State.TRYING or state is State.PROCEEDING):
            _fail(self, TIMEOUT, Timer.E)
        elif timer is Timer.K and state is State.COMPLETED:
            _terminate(self)

    def on_transport_error(self) -> None:
        """The request could not be delivered, or its connection was lost before a final response."""
        if self.state is State.TRYING or self.state is State.PROCEEDING:
            _fail(self, TRANSPORT_ERROR, Timer.E, Timer.F)


ServerTransaction = InviteServer | NonInviteServer
ClientTransaction = InviteClient | NonInviteClient


def _terminate(txn: ServerTransaction | ClientTransaction) -> None:
    if txn.state is not State.TERMINATED:
        txn.state = State.TERMINATED
        txn.outbox.terminated(txn)


def _fail(txn: ClientTransaction, status: int, *armed: Timer) -> None:
    """No final response will come: disarm the ``armed`` timers, report ``status`` to the TU and end."""
    for timer in armed:
        txn.outbox.disarm(txn, timer)
    txn.state = State.TERMINATED
    txn.outbox.failed(txn, status)
    txn.outbox.terminated(txn)


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
