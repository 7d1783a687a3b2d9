"""The faults, each made on purpose under steady load, and one run of the rig around a fault.

A fault is an action on the rig that lasts about ``seconds`` and leaves things healed when it returns; the run
then waits one refresh interval (and for the leavers' bindings to run out), calls every phone that holds an
unexpired 200 from main, and checks the history (tests/faults/history.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tests.faults.history import Report
from tests.faults.rig import NAMES, Rig, RigConfig, etcd_host, sip_host
from tests.support.netns import Netns

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def kill_leader(rig: Rig, seconds: float) -> None:
    lead = rig.etcd.leader()
    lead.kill()
    rig.mark(f"etcd leader {lead.name} killed")
    time.sleep(seconds)
    lead.start()
    rig.mark(f"{lead.name} back")


def kill_follower(rig: Rig, seconds: float) -> None:
    follower = rig.etcd.followers()[0]
    follower.kill()
    rig.mark(f"etcd follower {follower.name} killed")
    time.sleep(seconds)
    follower.start()
    rig.mark(f"{follower.name} back")


def stop_leader(rig: Rig, seconds: float) -> None:
    """SIGSTOP: the member keeps its connections open and answers nothing (a hung process or a cut link)."""
    lead = rig.etcd.leader()
    lead.pause()
    rig.mark(f"etcd leader {lead.name} stopped (SIGSTOP)")
    time.sleep(seconds)
    lead.resume()
    rig.mark(f"{lead.name} continued")


def rolling_restart(rig: Rig, seconds: float) -> None:
    """Every member restarted in turn, the next once the cluster is healthy again (an etcd upgrade)."""
    for m in rig.etcd.members:
        m.stop()
        rig.mark(f"{m.name} stopped")
        time.sleep(seconds / 3)
        m.start()
        rig.etcd.wait_healthy()
        rig.mark(f"{m.name} back")


def lose_quorum(rig: Rig, seconds: float) -> None:
    """Two members of three killed: no quorum, so no write and no linearizable read, for ``seconds``."""
    gone = rig.etcd.members[:2]
    for m in gone:
        m.kill()
    rig.mark("quorum lost (two members killed)")
    time.sleep(seconds)
    for m in gone:
        m.launch()
    rig.etcd.wait_healthy()
    rig.mark("quorum back")


def cut_from_etcd(rig: Rig, seconds: float) -> None:
    """Registrar A cannot reach any etcd member (packets dropped both ways) while its phones refresh."""
    rig.drop("-d", etcd_host(0))
    rig.drop("-s", etcd_host(0))
    rig.mark("A cut from etcd")
    time.sleep(seconds)
    rig.heal()
    rig.mark("healed")


def refuse_etcd(rig: Rig, seconds: float) -> None:
    """Registrar A's connections to etcd reset and new ones refused (TCP RST), as from a host that is up
    but does not serve: the failure is seen at once instead of after a deadline."""
    rig.reject("-d", etcd_host(0), "-p", "tcp")
    rig.mark("A's etcd connections refused (RST)")
    time.sleep(seconds)
    rig.heal()
    rig.mark("healed")


def cut_from_peers(rig: Rig, seconds: float) -> None:
    """Registrar A and the other registrars cannot reach each other (hand-offs fail both ways)."""
    for i in range(1, len(NAMES)):
        rig.drop("-s", sip_host(0), "-d", sip_host(i))
        rig.drop("-s", sip_host(i), "-d", sip_host(0))
    rig.mark("A cut from B and C")
    t0 = time.monotonic()
    rig.mark(f"calls to A's phones through B during the cut: {rig.probe_calls('pA', 'B')}")
    time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
    rig.heal()
    rig.mark("healed")


def cut_from_main(rig: Rig, seconds: float) -> None:
    """Registrar A and Kamailio cannot reach each other."""
    from tests.faults.rig import MAIN_IP

    rig.drop("-s", sip_host(0), "-d", MAIN_IP)
    rig.drop("-s", MAIN_IP, "-d", sip_host(0))
    rig.mark("A cut from main")
    time.sleep(seconds)
    rig.heal()
    rig.mark("healed")


def packet_loss(rig: Rig, seconds: float, share: float = 0.1) -> None:
    """A share of every SIP datagram to or from any registrar dropped at random."""
    for way in ("-d", "-s"):
        rig.drop(
            way,
            "127.0.2.0/24",
            "-p",
            "udp",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            str(share),
        )
    rig.mark(f"{share:.0%} of SIP datagrams dropped")
    time.sleep(seconds)
    rig.heal()
    rig.mark("healed")


def kill_a_with_skew(rig: Rig, seconds: float) -> None:
    """With B's clock off: A is killed with SIGKILL and its phones move to B, so B (skewed) and C claim A's
    bindings, expire its leavers' and take over its phones' refreshes."""
    time.sleep(seconds / 2)
    rig.nodes["A"].kill9()
    rig.mark("A killed (SIGKILL)")
    rig.fleets["pA"].retarget(rig.nodes["B"])
    rig.mark("A's phones moved to B")
    time.sleep(seconds / 2)


@dataclass(frozen=True)
class Fault:
    name: str
    action: Callable[[Rig, float], None]
    seconds: float  # how long the fault lasts in the short run (make test); make bench runs longer
    skew: dict[str, str] = field(default_factory=dict)  # node → faketime offset, e.g. {"B": "+30s"}
    doc: str = ""
    expires: int | None = None  # the phones' lifetime, when the fault needs another than the rig's


FAULTS = {
    f.name: f
    for f in [
        Fault("kill-leader", kill_leader, 8, doc="the etcd leader killed (SIGKILL), back after the fault"),
        Fault("kill-follower", kill_follower, 8, doc="an etcd follower killed, back after the fault"),
        Fault("stop-leader", stop_leader, 8, doc="the etcd leader SIGSTOPped, then continued"),
        Fault("rolling-restart", rolling_restart, 6, doc="every etcd member restarted in turn"),
        Fault("quorum-loss", lose_quorum, 20, doc="two of three etcd members down for 20 s"),
        Fault("cut-etcd", cut_from_etcd, 10, doc="registrar A cut from every etcd member"),
        Fault("refuse-etcd", refuse_etcd, 10, doc="registrar A's etcd connections reset and refused"),
        Fault("cut-peers", cut_from_peers, 10, doc="registrar A cut from registrars B and C"),
        Fault("cut-main", cut_from_main, 10, doc="registrar A cut from the main registrar"),
        Fault("loss-10", packet_loss, 10, doc="10 % of SIP datagrams to and from the registrars dropped"),
        Fault("skew+2", kill_a_with_skew, 10, {"B": "+2s"}, "B's clock 2 s ahead; A killed, its phones to B"),
        Fault(
            "skew-2", kill_a_with_skew, 10, {"B": "-2s"}, "B's clock 2 s behind; A killed, its phones to B"
        ),
        Fault(
            "skew+30",
            kill_a_with_skew,
            10,
            {"B": "+30s"},
            "B's clock 30 s ahead; A killed, its phones to B",
            expires=120,
        ),
        Fault(
            "skew-30",
            kill_a_with_skew,
            10,
            {"B": "-30s"},
            "B's clock 30 s behind; A killed, its phones to B",
            expires=120,
        ),
    ]
}


def faketime_env(offset: str) -> dict[str, str]:
    """libfaketime (Debian `faketime`): the wall clock moved by ``offset``; the monotonic clock left alone."""
    return {"LD_PRELOAD": FAKETIME_LIB, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def run(tmp: Path, fault: Fault, config: RigConfig, seconds: float | None = None) -> Report:
    """One run: start the rig in a namespace of its own, let the leavers go, make the fault, wait one refresh
    interval and the leavers' expiry, call the live phones from main, check the history."""
    config = replace(
        config,
        node_env={n: faketime_env(o) for n, o in fault.skew.items()},
        expires=fault.expires or config.expires,
    )
    netns = Netns()
    try:
        with netns.entered():
            rig = Rig(tmp, netns, config)
            try:
                rig.start()
                rig.leavers_leave()
                fault.action(rig, fault.seconds if seconds is None else seconds)
                # One refresh interval after the fault, and the leavers' bindings run out (plus their
                # De-REGISTER's way to main).
                time.sleep(config.every_ms / 1000 + 1)
                settle = max(r[0] for r in rig.marks if r[1] == "leavers stopped") + config.leaver_expires + 3
                time.sleep(max(0.0, settle - time.time()))
                rig.mark("calls from main")
                calls = rig.call_live_phones(f"calls-{fault.name}")
                report = rig.report(fault.name, calls)
                if not report.ok:
                    report.diag = rig.diag()
                return report
            finally:
                rig.stop()
    finally:
        netns.delete()
