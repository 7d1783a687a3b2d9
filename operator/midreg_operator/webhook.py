"""The sidecar injection webhook's certificate: an operator-made CA and a serving certificate, kept in a
Secret so that every operator replica serves the same one, renewed before it expires, and reloaded into the
running server without a restart.

The API server trusts the CA through the ``caBundle`` of the webhook configuration
(:func:`sidecar.webhook_configuration`). The CA lives ten years; the serving certificate a year and is
renewed when less than a third of that is left, or when it names other hosts, or when it has expired. The
certificates are made with ``cryptography`` (ECDSA P-256: small, fast handshakes for the API server).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVING_DAYS = 365
RENEW_WHEN_LEFT = 1 / 3  # of the serving certificate's lifetime


@dataclass(frozen=True)
class WebhookSettings:
    """Where the webhook is served and how the API server reaches it, from the operator's environment (the
    chart sets these). ``url`` is for an operator running outside the cluster (tests, development)."""

    port: int
    namespace: str
    service: str | None
    secret: str
    url: str | None = None

    @classmethod
    def from_environment(cls) -> WebhookSettings | None:
        port = os.environ.get("MIDREG_WEBHOOK_PORT")
        if not port:
            return None  # sidecar injection off
        return cls(
            port=int(port),
            namespace=os.environ.get("MIDREG_WEBHOOK_NAMESPACE", "midreg-system"),
            service=os.environ.get("MIDREG_WEBHOOK_SERVICE") or None,
            secret=os.environ.get("MIDREG_WEBHOOK_SECRET", "midregistrar-webhook-tls"),
            url=os.environ.get("MIDREG_WEBHOOK_URL") or None,
        )

    @property
    def hosts(self) -> list[str]:
        """The names (and addresses) the serving certificate must carry."""
        if self.url:
            host = self.url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
            return [host]
        assert self.service, "MIDREG_WEBHOOK_SERVICE or MIDREG_WEBHOOK_URL is needed"
        base = f"{self.service}.{self.namespace}"
        return [self.service, base, f"{base}.svc", f"{base}.svc.cluster.local"]

    def client_config(self, ca_pem: bytes) -> dict[str, object]:
        bundle = base64.b64encode(ca_pem).decode()
        if self.url:
            return {"url": self.url, "caBundle": bundle}
        return {
            "service": {"namespace": self.namespace, "name": self.service, "port": self.port},
            "caBundle": bundle,
        }


@dataclass(frozen=True)
class Certificates:
    """PEM: the CA (certificate and key) and the serving certificate and key it signed."""

    ca_crt: bytes
    ca_key: bytes
    tls_crt: bytes
    tls_key: bytes

    def to_secret_data(self) -> dict[str, str]:
        return {
            k: base64.b64encode(v).decode()
            for k, v in (
                ("ca.crt", self.ca_crt),
                ("ca.key", self.ca_key),
                ("tls.crt", self.tls_crt),
                ("tls.key", self.tls_key),
            )
        }

    @classmethod
    def from_secret_data(cls, data: dict[str, str]) -> Certificates | None:
        try:
            return cls(*(base64.b64decode(data[k]) for k in ("ca.crt", "ca.key", "tls.crt", "tls.key")))
        except (KeyError, ValueError):
            return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def new_ca(now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    now = now or _now()
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-midregistrar webhook CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def new_serving(
    ca_crt: bytes,
    ca_key: bytes,
    hosts: Sequence[str],
    now: datetime.datetime | None = None,
    days: float = SERVING_DAYS,
) -> tuple[bytes, bytes]:
    """A serving certificate for ``hosts`` signed by the CA (``days`` may be negative: an expired one)."""
    now = now or _now()
    ca = x509.load_pem_x509_certificate(ca_crt)
    signer = serialization.load_pem_private_key(ca_key, password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    key = _key()
    start = min(now, now + datetime.timedelta(days=days)) - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start if days < 0 else now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue(hosts: Sequence[str], ca: tuple[bytes, bytes] | None = None) -> Certificates:
    """Fresh certificates for ``hosts``; the CA is kept when given (its ``caBundle`` stays valid)."""
    ca_crt, ca_key = ca or new_ca()
    crt, key = new_serving(ca_crt, ca_key, hosts)
    return Certificates(ca_crt, ca_key, crt, key)


def renewal_reason(
    certs: Certificates, hosts: Sequence[str], now: datetime.datetime | None = None
) -> str | None:
    """Why the serving certificate must be replaced (expired, expiring, other names, not the CA's), or
    None."""
    now = now or _now()
    try:
        cert = x509.load_pem_x509_certificate(certs.tls_crt)
        ca = x509.load_pem_x509_certificate(certs.ca_crt)
    except ValueError:
        return "unreadable certificate"
    if ca.not_valid_after_utc <= now:
        return "the CA has expired"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by the CA"
    if cert.not_valid_after_utc <= now:
        return "expired"
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    if cert.not_valid_after_utc - now < life * RENEW_WHEN_LEFT:
        return "less than a third of its lifetime left"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subject alternative names"
    if set(map(str, _san(hosts))) - set(map(str, san)):
        return "it does not name every host the webhook is reached at"
    return None


class ServingContext:
    """The webhook server's TLS context, whose certificate can be swapped for new connections. The files are
    what kopf's server loads at start (it makes a self-signed certificate of its own without them); later
    renewals are loaded into the same context."""

    def __init__(self, certs: Certificates, directory: Path | None = None) -> None:
        self.directory = directory or Path(tempfile.mkdtemp(prefix="midreg-webhook-"))
        self.certfile = self.directory / "tls.crt"
        self.keyfile = self.directory / "tls.key"
        self.context = ssl.create_default_context(purpose=ssl.Purpose.CLIENT_AUTH)
        self.serving: bytes = b""
        self.load(certs)

    def load(self, certs: Certificates) -> None:
        """Load a new serving certificate: open connections keep the old one, new ones get this one."""
        self.keyfile.touch(0o600)
        self.keyfile.write_bytes(certs.tls_key)
        self.certfile.write_bytes(certs.tls_crt)
        self.context.load_cert_chain(str(self.certfile), str(self.keyfile))
        self.serving = certs.tls_crt
