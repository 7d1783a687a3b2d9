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


# Inputs, as functions of the machine (the request it holds gives the responses and retransmissions).
Input = Callable[[object], None]


def timer(which: Timer) -> Input:
    return lambda txn: txn.on_timer(which)


def error() -> Input:
    return lambda txn: txn.on_transport_error()


def tu(status: int) -> Input:
    def feed(txn: object) -> None:
        assert isinstance(txn, InviteServer | NonInviteServer)
        request = _request("INVITE" if txn.invite else "OPTIONS")  # a completed non-INVITE released its own
        txn.send_response(make_response(request, status), txn.peer)

    return feed


def again(method: str | None = None) -> Input:
    """The request retransmitted (or, with ``method="ACK"``, the ACK of a non-2xx final)."""

    def feed(txn: object) -> None:
        assert isinstance(txn, InviteServer | NonInviteServer)
        txn.on_retransmission(_request(method or ("INVITE" if txn.invite else "OPTIONS")))

    return feed


# --------------------------------------------------------------------------------------------- clients


def _client(machine: type[InviteClient | NonInviteClient], peer: Peer) -> tuple[object, Recorder]:
    out = Recorder()
    request = _request("INVITE" if machine is InviteClient else "OPTIONS")
    txn = machine(out, Timers(), request, peer)
    txn.start()
    return _Keep(txn, request), out


class _Keep:
    """A client machine together with its request, so that responses can be built in any state."""

    def __init__(self, txn: InviteClient | NonInviteClient, request: Request) -> None:
        self.txn = txn
        self.data_request = request

    def on_response(self, response: Response) -> None:
        self.txn.on_response(response)

    def on_timer(self, which: Timer) -> None:
        self.txn.on_timer(which)

    def on_transport_error(self) -> None:
        self.txn.on_transport_error()


def cresp(status: int) -> Input:
    return lambda keep: keep.on_response(_response(keep.data_request, status))


A, B, D, E, F, G, H, I, K, L = (Timer[x] for x in "ABDEFGHIKL")  # noqa: E741

INVITE_CLIENT: list[tuple[str, list[Input], Input, list[Action], State]] = [
    ("Calling/A", [], timer(A), [("send", "INVITE"), ("arm", A, 1.0)], State.CALLING),
    ("Calling/A again", [timer(A)], timer(A), [("send", "INVITE"), ("arm", A, 2.0)], State.CALLING),
    ("Calling/1xx", [], cresp(180), [("disarm", A), ("up", 180)], State.PROCEEDING),
    (
        "Calling/2xx",
        [],
        cresp(200),
        [("disarm", A), ("disarm", B), ("up", 200), ("terminated",)],
        State.TERMINATED,
    ),
    (
        "Calling/3xx-6xx",
        [],
        cresp(486),
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
    ("Proceeding/1xx", [cresp(180)], cresp(183), [("up", 183)], State.PROCEEDING),
    ("Proceeding/A is gone", [cresp(180)], timer(A), [], State.PROCEEDING),
    (
        "Proceeding/2xx",
        [cresp(180)],
        cresp(200),
        [("disarm", B), ("up", 200), ("terminated",)],
        State.TERMINATED,
    ),
    (
        "Proceeding/3xx-6xx",
        [cresp(180)],
        cresp(603),
        [("disarm", B), ("send", "ACK"), ("up", 603), ("arm", D, 32.0)],
        State.COMPLETED,
    ),
    ("Proceeding/B", [cresp(180)], timer(B), [("failed", 408), ("terminated",)], State.TERMINATED),
    (
        "Proceeding/transport error",
        [cresp(180)],
        error(),
        [("disarm", B), ("failed", 503), ("terminated",)],
        State.TERMINATED,
    ),
    ("Completed/3xx-6xx", [cresp(486)], cresp(486), [("send", "ACK")], State.COMPLETED),
    ("Completed/2xx ignored", [cresp(486)], cresp(200), [], State.COMPLETED),
    ("Completed/transport error", [cresp(486)], error(), [("terminated",)], State.TERMINATED),
    ("Completed/D", [cresp(486)], timer(D), [("terminated",)], State.TERMINATED),
    ("Terminated/anything", [cresp(200)], cresp(486), [], State.TERMINATED),
]

NON_INVITE_CLIENT: list[tuple[str, list[Input], Input, list[Action], State]] = [
    ("Trying/E", [], timer(E), [("send", "OPTIONS"), ("arm", E, 1.0)], State.TRYING),
    (
        "Trying/E capped at T2",
        [timer(E), timer(E), timer(E)],
        timer(E),
        [("send", "OPTIONS"), ("arm", E, 4.0)],
        State.TRYING,
    ),
    ("Trying/1xx", [], cresp(100), [("up", 100)], State.PROCEEDING),
    (
        "Trying/200-699",
        [],
        cresp(200),
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
        [cresp(100)],
        timer(E),
        [("send", "OPTIONS"), ("arm", E, 4.0)],
        State.PROCEEDING,
    ),
    ("Proceeding/1xx", [cresp(100)], cresp(180), [("up", 180)], State.PROCEEDING),
    (
        "Proceeding/200-699",
        [cresp(100)],
        cresp(404),
        [("disarm", E), ("disarm", F), ("up", 404), ("arm", K, 5.0)],
        State.COMPLETED,
    ),
    (
        "Proceeding/F",
        [cresp(100)],
        timer(F),
        [("disarm", E), ("failed", 408), ("terminated",)],
        State.TERMINATED,
    ),
    (
        "Proceeding/transport error",
        [cresp(100)],
        error(),
        [("disarm", E), ("disarm", F), ("failed", 503), ("terminated",)],
        State.TERMINATED,
    ),
    ("Completed/200-699 absorbed", [cresp(200)], cresp(200), [], State.COMPLETED),
    ("Completed/transport error ignored", [cresp(200)], error(), [], State.COMPLETED),
    ("Completed/K", [cresp(200)], timer(K), [("terminated",)], State.TERMINATED),
]


def _run_client(
    machine: type[InviteClient | NonInviteClient],
    peer: Peer,
    path: list[Input],
    event: Input,
) -> tuple[list[Action], State]:
    keep, out = _client(machine, peer)
    for step in path:
        step(keep)
    out.actions.clear()
    event(keep)
    assert isinstance(keep, _Keep)
    return out.actions, keep.txn.state


@pytest.mark.parametrize(
    ("name", "path", "event", "actions", "state"), INVITE_CLIENT, ids=[r[0] for r in INVITE_CLIENT]
)
def test_invite_client_figure_5(
    name: str, path: list[Input], event: Input, actions: list[Action], state: State
) -> None:
    assert _run_client(InviteClient, MAIN, path, event) == (actions, state)


@pytest.mark.parametrize(
    ("name", "path", "event", "actions", "state"), NON_INVITE_CLIENT, ids=[r[0] for r in NON_INVITE_CLIENT]
)
def test_non_invite_client_figure_6(
    name: str, path: list[Input], event: Input, actions: list[Action], state: State
) -> None:
    assert _run_client(NonInviteClient, MAIN, path, event) == (actions, state)


@pytest.mark.parametrize(
    ("machine", "first"),
    [
        (InviteClient, [("send", "INVITE"), ("arm", A, 0.5), ("arm", B, 32.0)]),
        (NonInviteClient, [("send", "OPTIONS"), ("arm", E, 0.5), ("arm", F, 32.0)]),
    ],
)
def test_client_start_arms_retransmissions_only_over_udp(
    machine: type[InviteClient | NonInviteClient], first: list[Action]
) -> None:
    _, out = _client(machine, MAIN)
    assert out.actions == first
    _, out = _client(machine, TCP)
    assert out.actions == [first[0], first[2]]


def test_over_tcp_the_client_wait_timers_are_zero() -> None:
    assert _run_client(InviteClient, TCP, [], cresp(486))[0][-1] == ("arm", D, 0)
    assert _run_client(NonInviteClient, TCP, [], cresp(200))[0][-1] == ("arm", K, 0)


# --------------------------------------------------------------------------------------------- servers


def _server(
    machine: type[InviteServer | NonInviteServer], peer: Peer
) -> tuple[InviteServer | NonInviteServer, Recorder]:
    out = Recorder()
    request = _request("INVITE" if machine is InviteServer else "OPTIONS")
    return machine(out, Timers(), request, peer, server_key(request)), out


INVITE_SERVER: list[tuple[str, list[Input], Input, list[Action], State]] = [
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

NON_INVITE_SERVER: list[tuple[str, list[Input], Input, list[Action], State]] = [
    ("Trying/request", [], again(), [], State.TRYING),
    ("Trying/1xx from TU", [], tu(100), [("send", 100)], State.PROCEEDING),
    ("Trying/200-699 from TU", [], tu(200), [("send", 200), ("completed", 32.0)], State.COMPLETED),
    ("Proceeding/1xx from TU", [tu(100)], tu(183), [("send", 183)], State.PROCEEDING),
    ("Proceeding/request", [tu(100)], again(), [("send", 100)], State.PROCEEDING),
    ("Proceeding/200-699 from TU", [tu(100)], tu(404), [("send", 404), ("completed", 32.0)], State.COMPLETED),
    ("Completed/late answer", [tu(200)], tu(500), [], State.COMPLETED),
]


def _run_server(
    machine: type[InviteServer | NonInviteServer], peer: Peer, path: list[Input], event: Input
) -> tuple[list[Action], State]:
    txn, out = _server(machine, peer)
    for step in path:
        step(txn)
    out.actions.clear()
    event(txn)
    return out.actions, txn.state


@pytest.mark.parametrize(
    ("name", "path", "event", "actions", "state"), INVITE_SERVER, ids=[r[0] for r in INVITE_SERVER]
)
def test_invite_server_figure_7_and_rfc_6026(
    name: str, path: list[Input], event: Input, actions: list[Action], state: State
) -> None:
    assert _run_server(InviteServer, MAIN, path, event) == (actions, state)


@pytest.mark.parametrize(
    ("name", "path", "event", "actions", "state"), NON_INVITE_SERVER, ids=[r[0] for r in NON_INVITE_SERVER]
)
def test_non_invite_server_figure_8(
    name: str, path: list[Input], event: Input, actions: list[Action], state: State
) -> None:
    assert _run_server(NonInviteServer, MAIN, path, event) == (actions, state)


def test_over_tcp_the_server_sends_no_retransmissions_and_its_wait_timers_are_zero() -> None:
    assert _run_server(InviteServer, TCP, [], tu(486))[0] == [("send", 486), ("arm", H, 32.0)]
    assert _run_server(InviteServer, TCP, [tu(486)], again("ACK"))[0][-1] == ("arm", I, 0)
    assert _run_server(NonInviteServer, TCP, [], tu(200))[0] == [("send", 200), ("completed", 0)]


def test_a_timer_outside_its_state_does_nothing() -> None:
    """A timer the stack fires late (disarmed by a state change the heap has not seen) is ignored."""
    for machine, letters in ((InviteClient, "ABD"), (NonInviteClient, "EFK")):
        for letter in letters:
            assert (
                _run_client(machine, MAIN, [cresp(200), timer(Timer[letter])], timer(Timer[letter]))[0] == []
            )
    for letter in "GHIL":
        assert _run_server(InviteServer, MAIN, [], timer(Timer[letter])) == ([], State.PROCEEDING)
