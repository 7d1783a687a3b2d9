"""A MidRegistrar with a TLS transport on the real node: its certificate comes from a Secret in cert-manager's
format (``tls.crt``, ``tls.key``, ``ca.crt``) that the operator mounts into the pod; a phone registers over TLS
through the Service, verifying the certificate against the Secret's CA; the Secret is renewed (as cert-manager
does) and the running pod serves the new certificate on new connections without a restart, while the phone's
established connection keeps working. Certificates are made by the test (tests/support/pki.py)."""

from __future__ import annotations

import base64
import errno
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e import SELECTOR, Kube, midreg, midregistrar, wait_midreg_ready
from tests.support.kamailio import KamailioMain
from tests.support.phones import DOMAIN
from tests.support.pki import Pki
from tests.support.registrar import metric, metrics
from tests.support.sip import read_sip_stream_message, sip_request, status_code
from tests.support.wait import poll, wait_for

pytestmark = pytest.mark.node

NS = "voip-tls"
NAME = "edge-tls"
SERVER_NAME = "sip-tls.example.test"  # the name phones dial and the certificate carries


def secret(pki: Pki, name: str) -> dict[str, Any]:
    """A kubernetes.io/tls Secret as cert-manager writes it, with a certificate made now for SERVER_NAME."""
    crt, key = pki.sign(name, f"/CN={SERVER_NAME}", san=f"DNS:{SERVER_NAME}", server=True)

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": "sip-tls", "namespace": NS},
        "data": {"tls.crt": b64(crt), "tls.key": b64(key), "ca.crt": b64(pki.ca)},
    }


def served_certificate(ctx: ssl.SSLContext, addr: tuple[str, int]) -> bytes:
    """The DER certificate a new TLS connection to ``addr`` is given (verified against the CA)."""
    with (
        socket.create_connection(addr, timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return der


def certificate_once_routed(ctx: ssl.SSLContext, addr: tuple[str, int]) -> bytes | None:
    """``served_certificate``, or None while kube-proxy has not yet programmed a Service made a moment ago: the
    pod is Ready before that, and until then this rig's node answers "network unreachable" (it has no route
    for the service range; CI failed the test on that once), or "refused" while it knows no endpoint."""
    try:
        return served_certificate(ctx, addr)
    except OSError as exc:
        if exc.errno in (errno.ENETUNREACH, errno.ECONNREFUSED):
            return None
        raise


def register(conn: ssl.SSLSocket, cseq: int) -> int | None:
    local = conn.getsockname()[:2]
    msg = sip_request(
        "REGISTER", f"sip:{DOMAIN}", local, transport="TLS", from_uri=f"sip:tlsphone@{DOMAIN}",
        to_uri=f"sip:tlsphone@{DOMAIN}", call_id="tls-node-1", cseq=cseq,
        headers=[("Contact", f"<sip:tlsphone@{local[0]}:{local[1]};transport=tls>;expires=600")],
    )  # fmt: skip
    conn.sendall(msg)
    buf = bytearray()
    while True:
        data = read_sip_stream_message(conn, buf, 10)
        if data is None:
            return None
        code = status_code(data)
        if code is not None and code >= 200:
            return code


def test_tls_from_a_secret_and_renewed_without_a_restart(
    tmp_path: Path, kube: Kube, platform: dict[str, float], kamailio: KamailioMain
) -> None:
    pki = Pki(tmp_path / "pki")
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    kube.apply(secret(pki, "first"))
    transports = [{"protocol": "udp", "port": 5060}, {"protocol": "tls", "port": 5061}]
    tls = {"secretName": "sip-tls"}
    kube.apply(
        midregistrar(NS, NAME, kamailio, outgoingExpires=7200, replicas=1, tls=tls, transports=transports)
    )
    wait_midreg_ready(kube, NS, NAME, 1)
    (pod,) = kube.ready_pods(NS, SELECTOR.format(NAME))
    mounts = {m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
    assert "/etc/midregistrar/tls" in mounts, mounts
    svc = kube.json("get", "service", "-n", NS, NAME)
    tls_port = next(p for p in svc["spec"]["ports"] if p["port"] == 5061)
    assert tls_port["protocol"] == "TCP", svc["spec"]["ports"]
    addr = (svc["spec"]["clusterIP"], 5061)
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    first = wait_for(lambda: certificate_once_routed(ctx, addr), 30, "the TLS port through the new Service")

    with (
        socket.create_connection(addr, timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as conn,
    ):
        assert register(conn, 1) == 200, "relayed over TLS to Kamailio and answered"
        assert register(conn, 2) == 200, "the refresh over the same connection is absorbed"
        assert kamailio.lookup("tlsphone"), "Kamailio holds the phone's contact"

        renewed_at = time.monotonic()
        kube.apply(secret(pki, "second"))  # cert-manager renews: same Secret, new key and certificate
        assert poll(lambda: served_certificate(ctx, addr) != first, 120, 2), (
            "the renewed certificate is served"
        )
        took = time.monotonic() - renewed_at
        assert register(conn, 3) == 200, "the connection opened before the renewal still works"

    pod_ip = pod["status"]["podIP"]
    m = metrics(pod_ip, 9090)
    assert metric(m, "midregistrar_tls_certificate_reloads") >= 1, m
    assert metric(m, "midregistrar_tls_certificate_reload_failures") == 0
    (again,) = kube.ready_pods(NS, SELECTOR.format(NAME))
    restarts = [c["restartCount"] for c in again["status"]["containerStatuses"]]
    assert again["metadata"]["uid"] == pod["metadata"]["uid"] and restarts == [0], "no restart, no new pod"
    print(f"renewed certificate served {took:.1f} s after the Secret changed")
    conds = {c["type"]: c["status"] for c in midreg(kube, NS, NAME)["status"]["conditions"]}
    assert conds.get("Ready") == "True"
