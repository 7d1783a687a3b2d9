"""TLS for SIP (RFC 3261 §26.2.1, RFC 5630): the contexts of the listening side and of the side that dials,
and their reload when the certificate files change.

A Kubernetes Secret mounted as files (the way cert-manager renews a certificate) is updated by swapping a
symlink: the files keep their names and change their content. :meth:`TlsContexts.reload_if_changed` loads
the new pair into the same :class:`ssl.SSLContext` objects, so handshakes from then on use it while the
connections already established keep theirs. A pair that does not load (a key that does not match, a file
half-written) is refused with a log line and counted, and the previous certificate stays in use.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field

log = logging.getLogger("midregistrar.tls")

HANDSHAKE_TIMEOUT = 10.0


class TlsConfigError(ValueError):
    """The certificate, key or CA files cannot be used: the process refuses to start."""


@dataclass
class TlsStats:
    """Counters the shell exports as metrics."""

    handshake_failures: dict[str, int] = field(
        default_factory=dict
    )  # "server" (accepted) / "client" (dialled)
    reloads: int = 0
    reload_failures: int = 0

    def failed(self, side: str) -> None:
        self.handshake_failures[side] = self.handshake_failures.get(side, 0) + 1


def _stamp(path: str) -> tuple[int, int, int] | None:
    """What tells a changed file: its inode, size and modification time (through symlinks)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class TlsContexts:
    """``server``: for ``tls:`` listening sockets (None without a certificate); ``client``: for connections
    the registrar opens (to the main registrar, or to a phone's ``sips:``/``;transport=tls`` Contact), always
    verifying the peer's certificate and name, against ``ca`` or the system's trust store."""

    cert: str | None
    key: str | None
    client_ca: str | None  # phones and peers on tls: sockets must show a certificate this CA signed
    ca: str | None
    server: ssl.SSLContext | None = None
    client: ssl.SSLContext = field(init=False)
    stats: TlsStats = field(default_factory=TlsStats)
    _stamps: tuple[tuple[int, int, int] | None, ...] = ()

    def __post_init__(self) -> None:
        try:
            self.client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"cannot load the CA bundle {self.ca}: {exc}") from None
        if self.cert is None:
            return
        assert self.key is not None
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if self.client_ca:
            try:
                server.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise TlsConfigError(f"cannot load the client CA bundle {self.client_ca}: {exc}") from None
            server.verify_mode = ssl.CERT_REQUIRED
        self.server = server
        self._stamps = self._current()
        try:
            self._load()
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(
                f"cannot load the certificate {self.cert} with the key {self.key}: {exc}"
            ) from None

    def _current(self) -> tuple[tuple[int, int, int] | None, ...]:
        return (_stamp(self.cert or ""), _stamp(self.key or ""))

    def _load(self) -> None:
        assert self.server is not None and self.cert is not None
        self.server.load_cert_chain(self.cert, self.key)
        # The same certificate answers a main registrar that asks the registrar for one (mutual TLS).
        self.client.load_cert_chain(self.cert, self.key)

    def reload_if_changed(self) -> bool:
        """Load the certificate again when its files changed; True when a new one is in use."""
        if self.server is None:
            return False
        stamps = self._current()
        if stamps == self._stamps or None in stamps:
            return False
        self._stamps = stamps
        try:
            self._load()
        except (OSError, ssl.SSLError) as exc:
            self.stats.reload_failures += 1
            log.error("TLS certificate %s not reloaded, the previous one stays in use: %s", self.cert, exc)
            return False
        self.stats.reloads += 1
        log.info("TLS certificate %s reloaded: new connections use it", self.cert)
        return True


def describe_failure(exc: BaseException) -> str:
    """A handshake failure as an operator reads it: the verification error when there is one."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "no handshake within the timeout"
    return str(exc) or type(exc).__name__
