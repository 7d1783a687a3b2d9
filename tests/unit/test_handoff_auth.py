"""Hand-offs between processes authenticated by an HMAC (registrar.core.handoff), not by address: a request
handed over with a MAC from a shared key reaches the phone whatever address it came from; a forged, stale,
moved or unsigned one is ignored and counted; keys rotate (the first signs, all verify)."""

from __future__ import annotations

from registrar.core.handoff import HandoffKeys, sign, verify
from registrar.sip.message import Request, parse_message
from registrar.sip.transport import Peer
from tests.unit.corekit import PHONE
from tests.unit.stackkit import MAIN, request_bytes
from tests.unit.test_core_store import _core, _owned_by, _registered, ctid_of

KEYS = HandoffKeys.from_text("first-key-0123456789abcdef\n")
OTHER = HandoffKeys.from_text("another-key-0123456789abcdef\n")
B_VIA = "SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-b1"  # the handing process's own Via, added after signing
STRANGER = Peer("udp", "198.51.100.9", 5060)


def handed_over(
    ctid: int, keys: HandoffKeys, now: float, call_id: str = "inv-1", value: str | None = None
) -> bytes:
    """The INVITE process b hands over: main's request, signed by b, then b's Via on top."""
    base = request_bytes("INVITE", "sip:alice@192.0.2.10:5062", branch="z9hG4bK-main1", call_id=call_id)
    request = parse_message(base)
    assert isinstance(request, Request)
    header = value if value is not None else sign(keys, "b", ctid, request, now)
    request.headers.prepend("Via", B_VIA)
    request.headers.add("X-Midreg-Flow", header)
    return request.to_bytes()


def _setup(keys: HandoffKeys | None = KEYS):  # type: ignore[no-untyped-def]
    m, store = _core()
    relayed = _registered(m, store)
    store.members["b"] = "udp:10.0.0.7:5060"
    m.core.state.handoff_keys = keys
    return m, store, int(ctid_of(relayed))


def _to_phone(m) -> list[Request]:  # type: ignore[no-untyped-def]
    return [x for x, p in m.take() if isinstance(x, Request) and p == PHONE and x.method == "INVITE"]


def test_a_signed_hand_off_reaches_the_phone_from_any_address() -> None:
    m, _, ctid = _setup()
    m.feed(handed_over(ctid, KEYS, m.now), STRANGER)  # the MAC, not the address, is what counts
    [out] = _to_phone(m)
    assert out.headers.get("x-midreg-flow") is None
    assert m.core.stats.handoffs_refused == 0


def test_a_forged_stale_moved_or_unsigned_hand_off_is_ignored_and_counted() -> None:
    m, _, ctid = _setup()
    cases = [
        handed_over(ctid, OTHER, m.now),  # another key
        handed_over(ctid, KEYS, m.now - 60),  # signed a minute ago: a replay
        handed_over(
            ctid, KEYS, m.now, value=sign(KEYS, "b", ctid, _main_invite("other-call"), m.now)
        ),  # moved
        handed_over(ctid, KEYS, m.now, value=f"b {ctid}"),  # unsigned while keys are configured
        handed_over(ctid, KEYS, m.now, value="garbage"),
    ]
    for i, data in enumerate(cases):
        m.feed(data.replace(b"z9hG4bK-b1", f"z9hG4bK-b1{i}".encode()), Peer("udp", "10.0.0.7", 5060))
        assert _to_phone(m) == [], f"case {i} reached the phone"
    assert m.core.stats.handoffs_refused == len(cases)


def test_a_sender_whose_clock_is_known_to_be_off_is_not_taken_for_a_replay() -> None:
    """b's clock runs 45 s ahead: its hand-offs look 45 s old to a plain check (refused as replays, and calls
    through any process but the phone's owner failed in the clock-skew fault runs). With the offset the
    store measured (member keys carry their writer's clock), the window applies to the true age."""
    m, store, ctid = _setup()
    m.feed(handed_over(ctid, KEYS, m.now + 45), STRANGER)
    assert _to_phone(m) == [] and m.core.stats.handoffs_refused == 1
    store.clock_offset = lambda member: 45.0 if member == "b" else 0.0
    m.feed(handed_over(ctid, KEYS, m.now + 45).replace(b"z9hG4bK-b1", b"z9hG4bK-b2"), STRANGER)
    assert len(_to_phone(m)) == 1 and m.core.stats.handoffs_refused == 1
    m.feed(handed_over(ctid, KEYS, m.now - 20).replace(b"z9hG4bK-b1", b"z9hG4bK-b3"), STRANGER)
    assert _to_phone(m) == [], "65 s old by b's clock: a replay still"
    assert m.core.stats.handoffs_refused == 2


def test_a_sender_that_is_not_a_member_is_refused_even_with_a_good_mac() -> None:
    m, store, ctid = _setup()
    del store.members["b"]
    m.feed(handed_over(ctid, KEYS, m.now), STRANGER)
    assert _to_phone(m) == [] and m.core.stats.handoffs_refused == 1


def test_keys_rotate_without_downtime() -> None:
    """The receiver knows the new key and the old one: hand-offs signed with either are taken."""
    m, _, ctid = _setup(HandoffKeys.from_text("new-key-0123456789abcdef\nfirst-key-0123456789abcdef\n"))
    m.feed(handed_over(ctid, KEYS, m.now), STRANGER)
    assert len(_to_phone(m)) == 1


def test_a_handing_process_signs_what_it_sends() -> None:
    m, store, _ = _setup()
    relayed_ctid = next(iter(store.load("alice@example.com").bindings))  # type: ignore[union-attr]
    _owned_by(store, "b")
    m.feed(
        request_bytes("INVITE", f"sip:alice@10.0.0.2:5060;ctid={relayed_ctid}", branch="z9hG4bK-inv9"), MAIN
    )
    [(request, peer)] = [(x, p) for x, p in m.take() if isinstance(x, Request) and x.method == "INVITE"]
    assert (peer.host, peer.port) == ("10.0.0.7", 5060)
    value = request.headers.get("x-midreg-flow")
    assert value is not None and len(value.split()) == 4
    handoff = verify(KEYS, value, request, m.now)
    assert handoff is not None and handoff.sender == "me" and handoff.ctid == relayed_ctid


def test_key_files_need_real_keys() -> None:
    for text in ("", "# only a comment\n", "short\n"):
        try:
            HandoffKeys.from_text(text)
        except ValueError:
            continue
        raise AssertionError(f"accepted {text!r}")


def _main_invite(call_id: str) -> Request:
    data = request_bytes("INVITE", "sip:alice@192.0.2.10:5062", branch="z9hG4bK-main1", call_id=call_id)
    request = parse_message(data)
    assert isinstance(request, Request)
    return request
