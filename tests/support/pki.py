"""A throw-away certificate authority for the test servers that speak TLS (the control plane's API server and
its clients, an etcd with mutual TLS): openssl, RSA 2048, everything valid two days, all files in one folder."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Pki:
    """The CA is made when the object is; ``sign`` issues certificates from it into the same folder."""

    dir: Path

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "2", "-subj", "/CN=midreg-test-ca",
        )  # fmt: skip

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.dir, check=True, capture_output=True, timeout=60)

    def sign(
        self, name: str, subject: str, *, san: str | None = None, server: bool = False
    ) -> tuple[Path, Path]:
        """``<name>.crt`` and ``<name>.key`` for ``subject`` (e.g. ``/O=system:masters/CN=admin``): a client
        certificate, or with ``server`` one that serves and also dials as a client (etcd's gateway connects
        to its own port with its serving certificate); ``san`` as openssl writes it (``IP:127.0.0.1,…``)."""
        self._openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", subject,
        )  # fmt: skip
        lines = [
            "basicConstraints=CA:FALSE",
            "keyUsage=digitalSignature,keyEncipherment",
            f"extendedKeyUsage={'serverAuth,clientAuth' if server else 'clientAuth'}",
        ]
        if san:
            lines.append(f"subjectAltName={san}")
        (self.dir / f"{name}.ext").write_text("\n".join(lines) + "\n")
        self._openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        )  # fmt: skip
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"

    def sign_expired(self, name: str, subject: str, *, san: str) -> tuple[Path, Path]:
        """A server certificate from this CA whose validity ended in 2020 (``openssl ca`` takes explicit
        dates; ``x509 -days`` cannot go back in time)."""
        self._openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", subject,
        )  # fmt: skip
        (self.dir / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={san}\n"
        )
        (self.dir / "index.txt").touch()
        (self.dir / "ca.cnf").write_text(
            "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nnew_certs_dir = .\n"
            "serial = ca.srl\ndefault_md = sha256\npolicy = any\n[any]\ncommonName = supplied\n"
        )
        if not (self.dir / "ca.srl").exists():
            (self.dir / "ca.srl").write_text("1000\n")
        self._openssl(
            "ca", "-batch", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key", "-in", f"{name}.csr",
            "-out", f"{name}.crt", "-startdate", "20200101000000Z", "-enddate", "20200102000000Z",
            "-extfile", f"{name}.ext", "-notext",
        )  # fmt: skip
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"

    def key_pair(self, name: str) -> tuple[Path, Path]:
        """A bare RSA key pair, ``<name>.key`` and ``<name>.pub`` (a service-account token signing key)."""
        self._openssl("genrsa", "-out", f"{name}.key", "2048")
        self._openssl("rsa", "-in", f"{name}.key", "-pubout", "-out", f"{name}.pub")
        return self.dir / f"{name}.key", self.dir / f"{name}.pub"
