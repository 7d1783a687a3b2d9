"""Transport-level values shared by the sans-IO layers: where a message came from and where it goes.

No sockets here: the asyncio shell turns a :class:`Peer` into a socket or a connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from registrar.sip.fastinit import fast_frozen_init
from registrar.sip.headers import Via
from registrar.sip.uri import URI, SipURI

RELIABLE = frozenset({"tcp", "tls", "ws", "wss", "sctp"})
# Reliable, but each SIP message is one WebSocket message (RFC 7118 §5): no Content-Length framing.
MESSAGE_FRAMED = frozenset({"ws", "wss"})


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class Peer:
    """A remote address on a transport, optionally pinned to an existing connection (``conn``).

    ``local`` is the index of the listening socket the message arrived on or must leave from.
    """

    transport: str
    host: str
    port: int
    conn: int | None = None
    local: int = 0

    @property
    def reliable(self) -> bool:
        return self.transport in RELIABLE

    @property
    def stream(self) -> bool:
        """A byte stream, where a message's end is its Content-Length (TCP, TLS; not WebSocket)."""
        return self.transport in RELIABLE and self.transport not in MESSAGE_FRAMED

    def __str__(self) -> str:
        return f"{self.transport}:{ip_reference(self.host)}:{self.port}"


def uri_transport(transport: str) -> str:
    """The ``;transport=`` URI parameter that reaches ``transport`` ("" for UDP, the default). WebSocket,
    secure or not, is ``ws`` (RFC 7118 §5.2: a SIPS URI, not the parameter, asks for WSS)."""
    if transport == "udp":
        return ""
    return ";transport=ws" if transport == "wss" else f";transport={transport}"


def ip_reference(host: str) -> str:
    """A host as SIP writes it in a URI, a Via sent-by or a host:port: an IPv6 address in brackets
    (RFC 3261 §25.1 ``IPv6reference``, RFC 5118 §4); names and IPv4 addresses as they are."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def default_port(transport: str) -> int:
    return 5061 if transport in ("tls", "wss") else 5060


def peer_for_uri(uri: URI, local: int = 0) -> Peer:
    """Next hop for a SIP URI (RFC 3263 without DNS: maddr, host, port and transport as written)."""
    if not isinstance(uri, SipURI):
        raise ValueError(f"cannot route to a non-SIP URI: {uri}")
    host = uri.param("maddr") or uri.host
    transport = uri.transport
    port = uri.port or default_port(transport)
    return Peer(transport, host.strip("[]"), port, None, local)


def response_peer(via: Via, source: Peer) -> Peer:
    """Where a response to a request with this top Via goes (RFC 3261 §18.2.2, RFC 3581)."""
    if source.conn is not None and source.transport in RELIABLE:
        return source
    transport = via.transport.lower()
    received = rport = None
    for name, value in via.params:  # Via.received and Via.rport in one pass
        lname = name.lower()
        if lname == "received":
            if received is None:
                received = "" if value is None else value
        elif lname == "rport" and rport is None:
            rport = "" if value is None else value
    host = received or via.host
    if rport and len(rport) <= 5 and rport.isdigit() and rport.isascii() and 0 < int(rport) <= 65535:
        port = int(rport)
    elif rport == "":
        port = source.port
    else:  # no rport, or one that is not a port number (ignored, as if absent)
        port = via.port or default_port(transport)
    return Peer(transport, host.strip("[]"), port, None, source.local)
