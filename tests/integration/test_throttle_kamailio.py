"""Mid-registrar modes `contact` and `aor` against a real Kamailio main registrar (issue 3, item 7).

Every test starts, on loopback ports: Kamailio from tests/support/main_registrar.cfg (in-memory registrar,
digest auth for every REGISTER, except de-registrations coming from the mid-registrar's own IP:port, which
are trusted, behaviour §11; a binrpc ctl socket for `kamcmd ul.dump` / `stats.get_statistics`), then the
real `midregistrar run` process pointing at it, then SIPp phones (tests/support/scenarios/thr_*.xml).
What Kamailio holds and how many REGISTERs it received is read from Kamailio itself (ul.dump, counters
kept by its config); the mid-registrar's side from `/v1/aors/{aor}` and `/metrics`.

The call in mode aor is placed from the main side: a SIPp UAC sends the INVITE to Kamailio for
sip:alice@example.test; Kamailio's lookup("location") finds the aggregated contact and relays to the
mid-registrar, which forks it to both devices.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registrar.sip.transport import ip_reference
from tests.support.kamailio import KamailioMain
from tests.support.ports import free_port
from tests.support.registrar import Registrar, metric
from tests.support.sip import LOOPBACK, ipv6_loopback
from tests.support.sipp import SCENARIOS, Sipp, run_sipp
from tests.support.wait import poll

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sip_tools")]

DOMAIN = "example.test"
PASSWORD = "s3cret"


class Rig:
    """Kamailio main (auth, mid trusted for De-REGISTERs) + `midregistrar run` + phones; all stopped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.kam: KamailioMain | None = None
        self.reg: Registrar | None = None
        self.phones: list[Sipp] = []
        self.host = LOOPBACK  # where Kamailio and the registrar listen, and the first phone sends from
        self.second: tuple[str, int] | None = None  # dual stack: the registrar's IPv6 socket

    def start(self, mode: str, *extra: str, family: str = "ipv4") -> Rig:
        """``family``: ipv4, ipv6 (everything on ::1), or dual (Kamailio on IPv4; the registrar on an IPv4
        and an IPv6 socket; :meth:`phone` with ``second=True`` registers over IPv6)."""
        mid_port = free_port()
        self.host = "::1" if family == "ipv6" else LOOPBACK
        args = list(extra)
        if family == "dual":
            self.second = ("::1", free_port())
            args += ["--listen", f"udp:[::1]:{self.second[1]}"]
        self.kam = KamailioMain(
            self.tmp / "kamailio", mid_port=mid_port, password=PASSWORD, listen_ip=self.host, mid_ip=self.host
        ).start()
        self.reg = Registrar(
            self.kam.addr,
            mode=mode,
            port=mid_port,
            host=self.host,
            transports=("udp",),
            extra=args,
            workdir=self.tmp / "midreg",
        ).start(ready_timeout=20)
        return self

    def phone(
        self,
        user: str,
        expires: int,
        every_ms: int,
        name: str,
        ooc: str | None = None,
        second: bool = False,
    ) -> Sipp:
        assert self.reg is not None
        extra = ["-d", str(every_ms), "-recv_timeout", "20000"]
        if ooc:
            extra += ["-oocsf", str(SCENARIOS / ooc)]
        target = self.second if second and self.second is not None else self.reg.addr
        p = Sipp(
            "thr_phone",
            target,
            local_ip=target[0],
            keys={"user": user, "password": PASSWORD, "domain": DOMAIN, "expires": expires},
            calls=1,
            timeout_s=170,
            workdir=self.tmp / f"phone-{name}",
            name=name,
            extra=extra,
        ).start()
        self.phones.append(p)
        return p

    def stop(self) -> None:
        for p in self.phones:
            if p.proc is not None and p.proc.poll() is None:
                p.stop()
        if self.reg is not None:
            self.reg.stop()
        if self.kam is not None:
            self.kam.stop()

    def diag(self, *more: object) -> str:
        parts = [str(m) for m in more]
        if self.reg is not None:
            parts.append(f"--- midregistrar: {self.reg.command}\n{self.reg.log()}")
        for p in self.phones:
            if p.proc is not None:
                res = p.traces()
                parts.append(f"--- phone {p.name}\n" + res.describe()[-4000:])
        if self.kam is not None:
            parts.append("--- kamailio\n" + self.kam.log()[-4000:])
        return "\n".join(parts)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.stop()


def has_auth(kamailio_line: str) -> bool:
    """Kamailio logged a non-empty Authorization header for this REGISTER."""
    m = re.search(r"auth=(\d+)", kamailio_line)
    return bool(m and int(m.group(1)) > 0)


def replies(p: Sipp) -> list[str]:
    return p.log_lines("REPLY code=200")


def wait_replies(rig: Rig, phones: list[Sipp], n: int, timeout: float) -> None:
    ok = poll(lambda: all(len(replies(p)) >= n for p in phones), timeout)
    assert ok, f"every phone should have {n} 200 OK(s) within {timeout} s\n" + rig.diag()


def port_of(p: Sipp) -> int:
    return p.port


# ------------------------------------------------------------------------------------------ mode contact


def test_contact_mode_relays_authenticated_initial_and_absorbs_refreshes(rig: Rig) -> None:
    rig.start("contact", "--outgoing-expires", "60", "--min-expires", "1")
    assert rig.kam is not None and rig.reg is not None
    # Two devices of alice and one of bob, each refreshing every second with a 10 s lifetime.
    a1 = rig.phone("alice", 10, 1000, "alice1")
    a2 = rig.phone("alice", 10, 1000, "alice2")
    b1 = rig.phone("bob", 10, 1000, "bob1")
    phones = [a1, a2, b1]
    wait_replies(rig, phones, 1, 15)
    time.sleep(0.3)
    after_initial = rig.kam.counters()
    m0 = rig.reg.metrics()
    info = rig.diag(f"kamailio counters after the initial registrations: {after_initial}")

    # End to end digest: each device was challenged by Kamailio (401 relayed) and its retry accepted.
    for p in phones:
        assert p.log_lines("CHALLENGE code=401"), f"{p.name}: Kamailio's 401 must reach it\n" + info
    assert after_initial["reg_challenged"] == 3, info
    challenged = [ln for ln in rig.kam.register_lines() if not has_auth(ln)]
    assert len(challenged) == 3, info
    assert after_initial["reg_saved"] == 3, info
    assert after_initial["reg_total"] == 6, "Kamailio sees 2 REGISTERs per device (challenge, retry)\n" + info
    lines = rig.kam.register_lines()
    assert all(f"sp={rig.reg.port} " in ln for ln in lines), "every REGISTER comes from the mid-registrar"
    assert sum(has_auth(ln) for ln in lines) == 3, "three carry the phones' Authorization\n" + info

    # Refreshes: each phone refreshes ≥ 4 more times; Kamailio's count stays flat.
    n0 = {p.name: len(replies(p)) for p in phones}
    wait_replies(rig, phones, max(n0.values()) + 4, 15)
    after_refresh = rig.kam.counters()
    m1 = rig.reg.metrics()
    refreshes = sum(len(replies(p)) - n0[p.name] for p in phones)
    info = rig.diag(f"counters: {after_initial} → {after_refresh}; {refreshes} refreshes")
    assert after_refresh == after_initial, "refreshes must not reach Kamailio\n" + info
    absorbed = metric(m1, "midregistrar_registers", outcome="absorbed") - metric(
        m0, "midregistrar_registers", outcome="absorbed"
    )
    relayed = metric(m1, "midregistrar_registers", outcome="relayed") - metric(
        m0, "midregistrar_registers", outcome="relayed"
    )
    assert relayed == 0, f"no REGISTER relayed during refreshes, metrics say {relayed}\n" + info
    assert absorbed >= refreshes >= 12, f"absorbed {absorbed} for {refreshes} refreshes\n" + info
    assert metric(m1, "midregistrar_registers", outcome="relayed") >= 6, info

    # Each phone is told its own contact with at most its 10 s, never the rewritten one.
    for p in phones:
        last = replies(p)[-1]
        assert f"@127.0.0.1:{port_of(p)}" in last and "ctid=" not in last, f"{p.name}: {last}"
        exp = [int(x) for x in re.findall(r"expires=(\d+)", last)]
        assert exp and max(exp) <= 10, f"{p.name}: lifetimes shown to the phone must be ≤ 10 s: {last}"

    # Kamailio holds one rewritten contact per device, ;ctid=N at the mid-registrar, lifetime 60.
    alice = rig.kam.contacts_of("alice")
    bob = rig.kam.contacts_of("bob")
    info = rig.diag(f"ul.dump:\n{rig.kam.ul_dump()[-4000:]}")
    assert len(alice) == 2 and len(bob) == 1, info
    ct_re = re.compile(rf"^sip:(alice|bob)@127\.0\.0\.1:{rig.reg.port};ctid=(\d+)$")
    for c in alice + bob:
        m = ct_re.match(c.address)
        assert m and m.group(1) == c.aor, (
            f"Kamailio must hold the rewritten contact, got {c.address}\n" + info
        )
        # Granted 60 at the initial REGISTER, ≥ 5 s ago, never refreshed since.
        assert 30 <= c.expires <= 56, f"outgoing lifetime 60 minus the time since the relay: {c}\n" + info
    kam_ctids = {ct_re.match(c.address).group(2) for c in alice}  # type: ignore[union-attr]

    view = rig.reg.aor_view(f"alice@{DOMAIN}")
    assert view is not None, info
    assert view["mode"] == "contact" and len(view["bindings"]) == 2, view
    assert {b["ctid"] for b in view["bindings"]} == kam_ctids, f"same ids on both sides: {view}"
    for b in view["bindings"]:
        assert b["main"]["expires"] == 60, f"main granted 60: {b}"
        assert 0 < b["expires"] <= 10, f"local lifetime ≤ 10: {b}"
        assert b["main"]["relayed_ago"] >= 4, f"LRTs must not move on absorbed refreshes: {b}"


def test_contact_mode_expired_phone_is_deregistered_at_kamailio(rig: Rig) -> None:
    rig.start("contact", "--outgoing-expires", "60", "--min-expires", "1")
    assert rig.kam is not None and rig.reg is not None
    keeper = rig.phone("alice", 3, 1000, "keeper")  # refreshes every second: stays
    quitter = rig.phone("alice", 3, 600000, "quitter")  # registers once, then silent
    wait_replies(rig, [keeper, quitter], 1, 15)
    t_reg = time.monotonic()
    time.sleep(0.2)
    quitter_port = port_of(quitter)
    held = rig.kam.contacts_of("alice")
    info = rig.diag(f"ul.dump:\n{rig.kam.ul_dump()[-3000:]}")
    assert len(held) == 2, info
    view = rig.reg.aor_view(f"alice@{DOMAIN}")
    assert view is not None and len(view["bindings"]) == 2, info
    gone_ctid = next(b["ctid"] for b in view["bindings"] if f"@127.0.0.1:{quitter_port}" in b["contact"])

    # 3 s lifetime + at most 2 s for the De-REGISTER (issue 3 item 3) + margin.
    def dropped() -> bool:
        return all(not c.address.endswith(f";ctid={gone_ctid}") for c in rig.kam.contacts_of("alice"))

    ok = poll(dropped, 8, interval=0.2)
    took = time.monotonic() - t_reg
    counters = rig.kam.counters()
    m = rig.reg.metrics()
    info = rig.diag(f"counters {counters}; took {took:.1f} s; ul.dump:\n{rig.kam.ul_dump()[-3000:]}")
    assert ok, "the expired phone's contact must be removed from Kamailio by the De-REGISTER\n" + info
    assert took <= 3 + 2 + 1.5, f"De-REGISTER must leave within 2 s of expiry, took {took:.1f} s\n" + info
    assert metric(m, "midregistrar_deregisters_sent") == 1, info
    assert counters["dereg_trusted"] == 1, "Kamailio accepted one trusted De-REGISTER\n" + info
    dereg = [ln for ln in rig.kam.register_lines() if f";ctid={gone_ctid}>;expires=0" in ln]
    assert len(dereg) == 1 and not has_auth(dereg[0]), f"one unauthenticated De-REGISTER: {dereg}\n" + info
    left = rig.kam.contacts_of("alice")
    assert len(left) == 1 and not left[0].address.endswith(gone_ctid), "the refreshing device stays\n" + info
    time.sleep(1.0)
    assert metric(rig.reg.metrics(), "midregistrar_deregisters_sent") == 1, "exactly one"


# ---------------------------------------------------------------------------------------------- mode aor


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "dual"])
def test_aor_mode_one_aggregated_contact_and_call_forks_to_both_devices(rig: Rig, family: str) -> None:
    """Also on IPv6 (Kamailio, the registrar and the phones on ::1), and dual stack: the second device
    registers over the registrar's IPv6 socket while Kamailio is on IPv4, and the call reaches it over IPv6."""
    if family != "ipv4" and not ipv6_loopback():
        pytest.fail("this machine has no IPv6 loopback (::1): the IPv6 runs need one")
    rig.start("aor", "--outgoing-expires", "60", "--min-expires", "1", family=family)
    assert rig.kam is not None and rig.reg is not None
    # Device 1 answers calls, device 2 only rings; both registered for 12 s and silent afterwards.
    d1 = rig.phone("alice", 12, 600000, "answers", ooc="phone_answer_ooc.xml")
    d1_port = port_of(d1)
    wait_replies(rig, [d1], 1, 15)
    d2 = rig.phone("alice", 12, 600000, "rings", ooc="thr_ring_ooc.xml", second=family == "dual")
    d2_host = ip_reference(rig.second[0] if rig.second else rig.host)
    wait_replies(rig, [d2], 1, 15)
    t_reg = time.monotonic()
    time.sleep(0.3)

    held = rig.kam.contacts_of("alice")
    info = rig.diag(f"counters {rig.kam.counters()}; ul.dump:\n{rig.kam.ul_dump()[-3000:]}")
    assert len(held) == 1, "Kamailio must hold ONE aggregated contact for the two devices\n" + info
    assert held[0].address == f"sip:alice%40{DOMAIN}@{ip_reference(rig.host)}:{rig.reg.port}", info
    assert 50 <= held[0].expires <= 60, f"outgoing lifetime 60: {held[0]}\n" + info
    view = rig.reg.aor_view(f"alice@{DOMAIN}")
    assert view is not None and view["mode"] == "aor" and len(view["bindings"]) == 2, f"{view}\n" + info
    assert d1.log_lines("CHALLENGE code=401"), "the first device is authenticated by Kamailio\n" + info

    # A call from the main side: SIPp UAC → Kamailio (lookup → aggregated contact) → mid-registrar → fork.
    caller = run_sipp(
        "main_invite_uac",
        rig.kam.addr,
        local_ip=rig.host,
        keys={"ruri": f"sip:alice@{DOMAIN}", "caller": "pbx"},
        calls=1,
        wait=40,
        workdir=rig.tmp / "caller",
        extra=["-recv_timeout", "20000"],
    )
    poll(lambda: d1.log_lines("CALL done") and d2.log_lines("CALL acked487"), 5)
    info = rig.diag(caller.describe()[-5000:])
    inv1, inv2 = d1.log_lines("CALL invite"), d2.log_lines("CALL invite")
    assert inv1 and inv2, "the INVITE must reach BOTH devices (parallel fork)\n" + info
    assert f"ruri=sip:alice@{ip_reference(rig.host)}:{d1_port}" in inv1[0], inv1
    assert f"ruri=sip:alice@{d2_host}:{port_of(d2)}" in inv2[0], inv2
    assert caller.returncode == 0, "INVITE → 200, ACK, BYE → 200 must complete\n" + info
    assert any(ln.startswith("INVITE final=200") for ln in caller.logs), info
    assert any(ln.startswith("BYE final=200") for ln in caller.logs), info
    assert d1.log_lines("CALL acked") and d1.log_lines("CALL done"), info
    assert d2.log_lines("CALL cancelled"), "the ringing device's branch must be CANCELled\n" + info

    # Both devices stop refreshing: when the AoR empties, one De-REGISTER of the aggregated contact.
    before = rig.kam.counters()
    ok = poll(lambda: not rig.kam.contacts_of("alice"), max(1.0, 12 - (time.monotonic() - t_reg)) + 4)
    counters = rig.kam.counters()
    m = rig.reg.metrics()
    info = rig.diag(f"counters {before} → {counters}; ul.dump:\n{rig.kam.ul_dump()[-2000:]}")
    assert ok, "the aggregated contact must be removed at Kamailio when the last device expires\n" + info
    assert metric(m, "midregistrar_deregisters_sent") == 1, info
    assert counters["dereg_trusted"] == 1, info
