"""Proxy core (RFC 3261 §16): request forwarding and the response context of a forked request.

Pure functions prepare the forwarded copies (Max-Forwards, Via, Record-Route, Route pre-processing, loop
detection); :class:`ResponseContext` collects the branches' responses and picks what goes upstream
(§16.7). The stack drives both; nothing here sends anything itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field

from registrar.sip.headers import MAGIC_COOKIE, Via
from registrar.sip.message import Header, Headers, Request, Response, parse_via_list, typed_header
from registrar.sip.transaction import ClientTransaction, ServerTransaction
from registrar.sip.transport import Peer
from registrar.sip.uri import URI

DEFAULT_MAX_FORWARDS = 70
# Preferred statuses within a class when picking the best response (RFC 3261 §16.7 step 6).
_PREFERRED = (401, 407, 415, 420, 484)


def loop_hash(request: Request) -> str:
    """Hash of the fields whose change makes a returning request a spiral, not a loop (§16.6 step 8)."""
    headers = request.headers
    parts = (
        request.uri_text,
        request.from_.tag or "",
        request.to.tag or "",
        request.call_id,
        str(request.cseq.seq),
        ",".join(headers.fields("proxy-require")),
        ",".join(headers.fields("route")),
    )
    return hashlib.blake2s("\x00".join(parts).encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()


def is_loop(request: Request, local_vias: set[tuple[str, int]]) -> bool:
    """A Via of ours carrying the same loop hash means the request came back unchanged (§16.3 step 4)."""
    mine = [v for v in request.vias if (v.host.lower(), v.port or 5060) in local_vias]
    if not mine:
        return False
    digest = loop_hash(request)
    return any((v.branch or "").startswith(f"{MAGIC_COOKIE}-{digest}-") for v in mine)


def make_branch(request: Request, unique: str) -> str:
    return f"{MAGIC_COOKIE}-{loop_hash(request)}-{unique}"


FLOW_PREFIX = "fl-"  # user part of a Record-Route that names a phone's flow (RFC 5626 §5.3 flow token)


def flow_token(peer: Peer) -> str:
    """A phone's flow as the user part of our Record-Route: the transport, address, port and connection
    an in-dialog request must go back over, so that a phone reached over a connection it opened (or behind
    NAT) stays reachable for the whole dialog. URL-safe base64 (unreserved characters only)."""
    text = f"{peer.transport} {peer.host} {peer.port} {'' if peer.conn is None else peer.conn} {peer.local}"
    return FLOW_PREFIX + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def flow_of(user: str | None) -> Peer | None:
    """The flow a token from :func:`flow_token` names; None when ``user`` is not one (or is garbled)."""
    if not user or not user.startswith(FLOW_PREFIX):
        return None
    data = user[len(FLOW_PREFIX) :]
    try:
        text = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)).decode()
        transport, host, port, conn, local = text.split(" ")
        return Peer(transport, host, int(port), int(conn) if conn else None, int(local))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def forward_copy(
    request: Request,
    *,
    uri: URI | None,
    via: Via,
    record_route: str | tuple[str, ...] | None = None,
    drop_top_route: bool = False,
) -> Request:
    """The copy of a request sent on one branch (§16.6 steps 1–8). ``record_route``: our Record-Route, or
    two of them (RFC 5658 double record-routing), prepended in the order given."""
    out = request.copy()
    if uri is not None:
        out.uri = uri
    if drop_top_route:
        out.headers.pop_first_value("route")
    mf = out.headers.get("max-forwards")
    out.headers.set("Max-Forwards", str(int(mf) - 1) if mf is not None else str(DEFAULT_MAX_FORWARDS))
    if record_route and out.method not in ("REGISTER", "ACK", "CANCEL"):
        for value in (record_route,) if isinstance(record_route, str) else record_route:
            out.headers.prepend("Record-Route", value)
    # The new top Via is the one the client transaction matches on: keep it typed, not parsed back.
    out.headers.prepend_header(typed_header("Via", str(via), parse_via_list, [via]))
    return out


def strip_top_via(response: Response) -> Response:
    """The response as it goes upstream: our Via removed (§16.7 step 9)."""
    out = response.copy()
    out.headers.pop_first_value("via")
    return out


def build_cancel(branch_request: Request) -> Request:
    """CANCEL for a pending branch: same R-URI, Call-ID, From, To, CSeq number, top Via, Route (§9.1)."""
    items: list[Header] = [Header("Via", branch_request.headers.values("via")[0])]
    for h in branch_request.headers:
        if h.key in ("from", "to", "call-id", "route", "max-forwards"):
            items.append(h)
    items.append(Header("CSeq", f"{branch_request.cseq.seq} CANCEL"))
    items.append(Header("Content-Length", "0"))
    return Request("CANCEL", branch_request.uri, Headers(items))


@dataclass
class Branch:
    txn: ClientTransaction
    target: Peer
    final: Response | None = None
    cancel_wanted: bool = False
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.final is not None


@dataclass
class ResponseContext:
    """One proxied request and its branches (§16.7).

    With ``hold_final`` the chosen final response is handed to the application (which may rewrite it, as
    the mid-registrar does with a REGISTER's 2xx) instead of going upstream at once.
    """

    server: ServerTransaction
    request: Request
    source: Peer
    hold_final: bool = False
    branches: list[Branch] = field(default_factory=list)
    best: Response | None = None
    finished: bool = False

    @property
    def invite(self) -> bool:
        return self.request.method == "INVITE"

    def branch_for(self, txn: ClientTransaction) -> Branch | None:
        for b in self.branches:
            if b.txn is txn:
                return b
        return None

    def all_done(self) -> bool:
        return all(b.done for b in self.branches)

    def record_final(self, branch: Branch, response: Response) -> None:
        branch.final = response
        if response.status >= 200 and (self.best is None or _better(response, self.best)):
            self.best = response

    def choose(self) -> Response:
        """The response to send upstream once every branch is done (§16.7 step 6)."""
        assert self.best is not None
        best = self.best
        if best.status in (401, 407):
            best = best.copy()
            name = "www-authenticate" if best.status == 401 else "proxy-authenticate"
            mine = set(best.headers.fields(name))
            for b in self.branches:
                if b.final is not None and b.final is not self.best and b.final.status in (401, 407):
                    for value in b.final.headers.fields(name):
                        if value not in mine:
                            best.headers.add(name.title(), value)
                            mine.add(value)
        return best


def _rank(response: Response) -> tuple[int, int]:
    status = response.status
    if status >= 600:
        cls = 0
    elif status < 300:
        cls = -1
    else:
        cls = status // 100
    return (cls, 0 if status in _PREFERRED else 1)


def _better(candidate: Response, current: Response) -> bool:
    return _rank(candidate) < _rank(current)
