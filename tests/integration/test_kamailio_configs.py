"""The Kamailio configurations under bench/kamailio/ start and work with SIPp (used by benchmarks and tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.kamailio import Kamailio
from tests.support.sip import LOOPBACK
from tests.support.sipp import Sipp, run_sipp

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sip_tools")]

KAM = REPO / "bench" / "kamailio"
PHONE = {"user": "alice", "domain": "example.test", "expires": 1800}


def test_proxy_cfg_relays_registers_to_next_hop(tmp_path: Path) -> None:
    uas = Sipp("main_uas", None, timeout_s=60, workdir=tmp_path / "uas").start().wait_bound()
    kam = Kamailio(
        KAM / "proxy.cfg", defines={"NEXT_HOP": f'"sip:{LOOPBACK}:{uas.port}"'}, workdir=tmp_path / "kam"
    )
    try:
        assert kam.check().returncode == 0
        kam.start()
        phone = run_sipp(
            "phone_register", (LOOPBACK, kam.port), keys=PHONE, calls=1, wait=30, workdir=tmp_path / "phone"
        )
    finally:
        kam.stop()
        got = uas.stop()
    assert phone.returncode == 0, phone.describe() + kam.log()[-2000:]
    assert len([x for x in got.logs if x.startswith("RX REGISTER")]) == 3, got.describe()


@pytest.mark.parametrize("auth", [False, True], ids=["open", "digest"])
def test_registrar_cfg_registers(tmp_path: Path, auth: bool) -> None:
    defines: dict[str, object] = {"WITH_AUTH": 1, "AUTH_PASSWORD": '"pw"'} if auth else {}
    kam = Kamailio(KAM / "registrar.cfg", defines=defines, workdir=tmp_path / "kam")
    users = tmp_path / "users.csv"
    users.write_text("SEQUENTIAL\n" + "".join(f"user{i:03d};pw;example.test\n" for i in range(50)))
    try:
        assert kam.check().returncode == 0
        kam.start()
        if auth:
            good = run_sipp(
                "load_register_auth",
                (LOOPBACK, kam.port),
                keys={"expires": 600},
                inf=users,
                calls=50,
                rate=100,
                wait=30,
                trace_msg=False,
                workdir=tmp_path / "good",
            )
            users.write_text("SEQUENTIAL\nuser000;wrong;example.test\n")
            bad = run_sipp(
                "load_register_auth",
                (LOOPBACK, kam.port),
                keys={"expires": 600},
                inf=users,
                calls=1,
                wait=30,
                workdir=tmp_path / "bad",
                extra=["-recv_timeout", "2000"],
            )
            assert bad.successful == 0, "a wrong password must not register"
        else:
            good = run_sipp(
                "phone_register",
                (LOOPBACK, kam.port),
                keys=PHONE,
                calls=1,
                wait=30,
                workdir=tmp_path / "good",
            )
    finally:
        kam.stop()
    assert good.returncode == 0 and good.failed == 0, good.describe() + kam.log()[-2000:]
