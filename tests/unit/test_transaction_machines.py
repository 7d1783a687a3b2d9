"""Every transition of the four transaction machines (RFC 3261 figures 5–8, RFC 6026's Accepted), row by row.

Each case drives a machine into a state with legal inputs, feeds one more input and checks exactly what the
machine asked of its stack and the state it ends in. The rows follow the tables in the machines' docstrings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from registrar.sip.message import Request, Response, make_response, parse_message
from registrar.sip.transaction import (
    InviteClient,
    InviteServer,
    NonInviteClient,
    NonInviteServer,
    State,
    Timer,
    Timers,
    server_key,
)
from registrar.sip.transport import Peer
from tests.unit.stackkit import MAIN, request_bytes, response_to

TCP = Peer("tcp", "10.0.0.3", 5070, conn=3)
Action = tuple[object, ...]


@dataclass
class Recorder:
    """An outbox that writes down what a machine asks for: sends by method or status, timers by letter."""

    actions: list[Action] = field(default_factory=list)

    def send(self, data: bytes, peer: Peer) -> None:
        first = data.split(b"\r\n", 1)[0].decode()
        self.actions.append(
            ("send", int(first.split()[1]) if first.startswith("SIP/2.0") else first.split()[0])
        )

    def arm(self, txn: object, timer: Timer, delay: float) -> None:
        self.actions.append(("arm", timer, delay))

    def disarm(self, txn: object, timer: Timer) -> None:
        self.actions.append(("disarm", timer))

    def response_in(self, txn: object, response: Response) -> None:
        self.actions.append(("up", response.status))

    def failed(self, txn: object, status: int) -> None:
        self.actions.append(("failed", status))

    def terminated(self, txn: object) -> None:
        self.actions.append(("terminated",))

    def completed(self, txn: object, data: bytes, peer: Peer, timer_j: float) -> None:
        self.actions.append(("completed", timer_j))


def _request(method: str) -> Request:
    msg = parse_message(request_bytes(method))
    assert isinstance(msg, Request)
    return msg


def _response(request: Request, status: int) -> Response:
    msg = parse_message(response_to(request, status))
    assert isinstance(msg, Response)
    return msg


Machine = InviteClient | NonInviteClient | InviteServer | NonInviteServer


class Driven:
    """A machine with the request it was built from (a completed non-INVITE releases its own), so that
    responses and retransmissions can be built in any state."""

    def __init__(self, machine: type[Machine], peer: Peer) -> None:
        self.out = Recorder()
        self.request = _request("INVITE" if machine is InviteClient or machine is InviteServer else "OPTIONS")
        self.txn: Machine
        if machine is InviteClient or machine is NonInviteClient:
            self.txn = machine(self.out, Timers(), self.request, peer)
            self.txn.start()
        else:
            self.txn = machine(self.out, Timers(), self.request, peer, server_key(self.request))


Input = Callable[[Driven], None]
Row = tuple[str, list[Input], Input, list[Action], State]


def resp(status: int) -> Input:
    """A response from the network (client machines)."""

    def feed(m: Driven) -> None:
        assert isinstance(m.txn, InviteClient | NonInviteClient)
        m.txn.on_response(_response(m.request, status))

    return feed


def timer(which: Timer) -> Input:
    def feed(m: Driven) -> None:
        assert not isinstance(m.txn, NonInviteServer)  # it has no timers: the stack keeps its Timer J
        m.txn.on_timer(which)

    return feed


def error() -> Input:
    """A transport error (client machines)."""

    def feed(m: Driven) -> None:
        assert isinstance(m.txn, InviteClient | NonInviteClient)
        m.txn.on_transport_error()

    return feed


def tu(status: int) -> Input:
    """A response from the TU (server machines)."""

    def feed(m: Driven) -> None:
        assert isinstance(m.txn, InviteServer | NonInviteServer)
        m.txn.send_response(make_response(m.request, status), m.txn.peer)

    return feed


def again(method: str | None = None) -> Input:
    """The request retransmitted (or, with ``method="ACK"``, the ACK of a non-2xx final): server machines."""

    def feed(m: Driven) -> None:
        assert isinstance(m.txn, InviteServer | NonInviteServer)
        m.txn.on_retransmission(_request(method or m.request.method))

    return feed


def _run(
    machine: type[Machine], path: list[Input], event: Input, peer: Peer = MAIN
) -> tuple[list[Action], State]:
    """What ``machine`` asks for on ``event`` once ``path`` has brought it into a state, and its next state."""
    m = Driven(machine, peer)
    for step in path:
        step(m)
    m.out.actions.clear()
    event(m)
    return m.out.actions, m.txn.state


A, B, D, E, F, G, H, I, K, L = (Timer[x] for x in "ABDEFGHIKL")  # noqa: E741

INVITE_CLIENT: list[Row] = [
    ("Calling/A", [], timer(A), [("send", "INVITE"), ("arm", A, 1.0)], State.CALLING),
    ("Calling/A again", [timer(A)], timer(A), [("send", "INVITE"), ("arm", A, 2.0)], State.CALLING),
    ("Calling/1xx", [], resp(180), [("disarm", A), ("up", 180)], State.PROCEEDING),
    (
        "Calling/2xx",
        [],
        resp(200),
        [("disarm", A), ("disarm", B), ("up", 200), ("terminated",)],
        State.TERMINATED,
    ),
    (
        "Calling/3xx-6xx",
        [],
        resp(486),
        [("disarm", A), ("disarm", B), ("send", "ACK"), ("up", 486), ("arm", D, 32.0)],
        State.COMPLETED,
    ),
    ("Calling/B", [], timer(B), [("disarm", A), ("failed", 408), ("terminated",)], State.TERMINATED),
    (
        "Calling/transport error",
        [],
        error(),
        [("disarm", A), ("disarm", B), ("failed", 503), ("terminated",)],
        State.TERMINATED,
    ),
    ("Proceeding/1xx", [resp(180)], resp(183), [("up", 183)], State.PROCEEDING),
    ("Proceeding/A is gone", [resp(180)], timer(A), [], State.PROCEEDING),
    (
        "Proceeding/2xx",
        [resp(180)],
        resp(200),
        [("disarm", B), ("up", 200), ("terminated",)],
        State.TERMINATED,
    ),
    (
        "Proceeding/3xx-6xx",
        [resp(180)],
        resp(603),
        [("disarm", B), ("send", "ACK"), ("up", 603), ("arm", D, 32.0)],
        State.COMPLETED,
    ),
    ("Proceeding/B", [resp(180)], timer(B), [("failed", 408), ("terminated",)], State.TERMINATED),
    (
        "Proceeding/transport error",
        [resp(180)],
        error(),
        [("disarm", B), ("failed", 503), ("terminated",)],
        State.TERMINATED,
    ),
    ("Completed/3xx-6xx", [resp(486)], resp(486), [("send", "ACK")], State.COMPLETED),
    ("Completed/2xx ignored", [resp(486)], resp(200), [], State.COMPLETED),
    ("Completed/transport error", [resp(486)], error(), [("terminated",)], State.TERMINATED),
    ("Completed/D", [resp(486)], timer(D), [("terminated",)], State.TERMINATED),
    ("Terminated/anything", [resp(200)], resp(486), [], State.TERMINATED),
]

NON_INVITE_CLIENT: list[Row] = [
    ("Trying/E", [], timer(E), [("send", "OPTIONS"), ("arm", E, 1.0)], State.TRYING),
    (
        "Trying/E capped at T2",
        [timer(E), timer(E), timer(E)],
        timer(E),
        [("send", "OPTIONS"), ("arm", E, 4.0)],
        State.TRYING,
    ),
    ("Trying/1xx", [], resp(100), [("up", 100)], State.PROCEEDING),
    (
        "Trying/200-699",
        [],
        resp(200),
        [("disarm", E), ("disarm", F), ("up", 200), ("arm", K, 5.0)],
        State.COMPLETED,
    ),
    ("Trying/F", [], timer(F), [("disarm", E), ("failed", 408), ("terminated",)], State.TERMINATED),
    (
        "Trying/transport error",
        [],
        error(),
        [("disarm", E), ("disarm", F), ("failed", 503), ("terminated",)],
        State.TERMINATED,
    ),
    (
        "Proceeding/E every T2",
        [resp(100)],
        timer(E),
        [("send", "OPTIONS"), ("arm", E, 4.0)],
        State.PROCEEDING,
    ),
    ("Proceeding/1xx", [resp(100)], resp(180), [("up", 180)], State.PROCEEDING),
    (
        "Proceeding/200-699",
        [resp(100)],
        resp(404),
        [("disarm", E), ("disarm", F), ("up", 404), ("arm", K, 5.0)],
        State.COMPLETED,
    ),
    (
        "Proceeding/F",
        [resp(100)],
        timer(F),
        [("disarm", E), ("failed", 408), ("terminated",)],
        State.TERMINATED,
    ),
    (
        "Proceeding/transport error",
        [resp(100)],
        error(),
        [("disarm", E), ("disarm", F), ("failed", 503), ("terminated",)],
        State.TERMINATED,
    ),
    ("Completed/200-699 absorbed", [resp(200)], resp(200), [], State.COMPLETED),
    ("Completed/transport error ignored", [resp(200)], error(), [], State.COMPLETED),
    ("Completed/K", [resp(200)], timer(K), [("terminated",)], State.TERMINATED),
]


INVITE_SERVER: list[Row] = [
    ("Proceeding/INVITE before any response", [], again(), [], State.PROCEEDING),
    ("Proceeding/1xx from TU", [], tu(180), [("send", 180)], State.PROCEEDING),
    ("Proceeding/INVITE", [tu(180)], again(), [("send", 180)], State.PROCEEDING),
    ("Proceeding/2xx from TU", [], tu(200), [("send", 200), ("arm", L, 32.0)], State.ACCEPTED),
    (
        "Proceeding/300-699 from TU",
        [],
        tu(486),
        [("send", 486), ("arm", G, 0.5), ("arm", H, 32.0)],
        State.COMPLETED,
    ),
    ("Accepted/2xx from TU", [tu(200)], tu(200), [("send", 200)], State.ACCEPTED),
    ("Accepted/non-2xx from TU", [tu(200)], tu(500), [], State.ACCEPTED),
    ("Accepted/INVITE", [tu(200)], again(), [], State.ACCEPTED),
    ("Accepted/L", [tu(200)], timer(L), [("terminated",)], State.TERMINATED),
    ("Completed/INVITE", [tu(486)], again(), [("send", 486)], State.COMPLETED),
    ("Completed/G", [tu(486)], timer(G), [("send", 486), ("arm", G, 1.0)], State.COMPLETED),
    (
        "Completed/G capped at T2",
        [tu(486), timer(G), timer(G), timer(G)],
        timer(G),
        [("send", 486), ("arm", G, 4.0)],
        State.COMPLETED,
    ),
    (
        "Completed/ACK",
        [tu(486)],
        again("ACK"),
        [("disarm", G), ("disarm", H), ("arm", I, 5.0)],
        State.CONFIRMED,
    ),
    ("Completed/H", [tu(486)], timer(H), [("disarm", G), ("terminated",)], State.TERMINATED),
    ("Completed/late answer", [tu(486)], tu(200), [], State.COMPLETED),
    ("Confirmed/INVITE absorbed", [tu(486), again("ACK")], again(), [], State.CONFIRMED),
    ("Confirmed/ACK absorbed", [tu(486), again("ACK")], again("ACK"), [], State.CONFIRMED),
    ("Confirmed/I", [tu(486), again("ACK")], timer(I), [("terminated",)], State.TERMINATED),
]

NON_INVITE_SERVER: list[Row] = [
    ("Trying/request", [], again(), [], State.TRYING),
    ("Trying/1xx from TU", [], tu(100), [("send", 100)], State.PROCEEDING),
    ("Trying/200-699 from TU", [], tu(200), [("send", 200), ("completed", 32.0)], State.COMPLETED),
    ("Proceeding/1xx from TU", [tu(100)], tu(183), [("send", 183)], State.PROCEEDING),
    ("Proceeding/request", [tu(100)], again(), [("send", 100)], State.PROCEEDING),
    ("Proceeding/200-699 from TU", [tu(100)], tu(404), [("send", 404), ("completed", 32.0)], State.COMPLETED),
    ("Completed/late answer", [tu(200)], tu(500), [], State.COMPLETED),
]


FIGURES: list[tuple[str, type[Machine], list[Row]]] = [
    ("figure 5", InviteClient, INVITE_CLIENT),
    ("figure 6", NonInviteClient, NON_INVITE_CLIENT),
    ("figure 7", InviteServer, INVITE_SERVER),
    ("figure 8", NonInviteServer, NON_INVITE_SERVER),
]


@pytest.mark.parametrize(
    ("machine", "path", "event", "actions", "state"),
    [(machine, *row[1:]) for _, machine, rows in FIGURES for row in rows],
    ids=[f"{figure} {row[0]}" for figure, _, rows in FIGURES for row in rows],
)
def test_every_transition(
    machine: type[Machine], path: list[Input], event: Input, actions: list[Action], state: State
) -> None:
    assert _run(machine, path, event) == (actions, state)


def test_a_client_arms_its_retransmission_timer_only_over_udp() -> None:
    assert Driven(InviteClient, MAIN).out.actions == [("send", "INVITE"), ("arm", A, 0.5), ("arm", B, 32.0)]
    assert Driven(InviteClient, TCP).out.actions == [("send", "INVITE"), ("arm", B, 32.0)]
    assert Driven(NonInviteClient, MAIN).out.actions == [
        ("send", "OPTIONS"),
        ("arm", E, 0.5),
        ("arm", F, 32.0),
    ]
    assert Driven(NonInviteClient, TCP).out.actions == [("send", "OPTIONS"), ("arm", F, 32.0)]


def test_over_tcp_no_retransmissions_and_the_wait_timers_are_zero() -> None:
    assert _run(InviteClient, [], resp(486), TCP)[0][-1] == ("arm", D, 0)
    assert _run(NonInviteClient, [], resp(200), TCP)[0][-1] == ("arm", K, 0)
    assert _run(InviteServer, [], tu(486), TCP)[0] == [("send", 486), ("arm", H, 32.0)]
    assert _run(InviteServer, [tu(486)], again("ACK"), TCP)[0][-1] == ("arm", I, 0)
    assert _run(NonInviteServer, [], tu(200), TCP)[0] == [("send", 200), ("completed", 0)]


def test_a_timer_outside_its_state_does_nothing() -> None:
    """A timer the stack fires late (disarmed by a state change the heap has not seen) is ignored."""
    for machine, letters in ((InviteClient, "ABD"), (NonInviteClient, "EFK")):
        for letter in letters:
            late = timer(Timer[letter])
            assert _run(machine, [resp(200), late], late)[0] == []
    for letter in "GHIL":
        assert _run(InviteServer, [], timer(Timer[letter])) == ([], State.PROCEEDING)
