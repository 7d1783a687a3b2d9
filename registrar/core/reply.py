"""Replies to the phone (behaviour §3.5): a 200 OK built here or rewritten from the main registrar's, listing
every valid binding of the AoR with its remaining lifetime, GRUUs and received address; and the errors
refusing a REGISTER. Pure functions: ``now`` comes in.
"""

from __future__ import annotations

from urllib.parse import unquote

from registrar.config import PathMode, Settings
from registrar.core.gruu import GruuContext, gruu_params
from registrar.core.policy import RegistrarError
from registrar.core.register import RegisterView, has_option_tag, supports_path, wants_outbound
from registrar.records import AorRecord, Binding
from registrar.sip.errors import ParseError
from registrar.sip.headers import is_digits, parse_address
from registrar.sip.message import Request, Response, make_response
from registrar.sip.transport import ip_reference, uri_transport
from registrar.sip.uri import SipURI, URIError, parse_uri


def gruu_context(view: RegisterView, hostport: str, now: float, settings: Settings) -> GruuContext | None:
    """GRUUs go to UAs that ask for them with `Supported: gruu` when enabled (behaviour §8.6)."""
    if not settings.gruu or not any(v.lower() == "gruu" for v in view.request.headers.values("supported")):
        return None
    return GruuContext(view.aor, hostport, now)


def echo_path(view: RegisterView, settings: Settings) -> bool:
    """Whether a 200 OK repeats the REGISTER's Path (path-lazy/strict with `Supported: path`, §8.4)."""
    return bool(view.paths) and settings.path_mode is not PathMode.OFF and supports_path(view.request)


def path_received(paths: list[str]) -> str | None:
    """path-received: the `received` of the first Path URI, or the second's when the first has `r2`."""
    try:
        uris = [parse_address(v, "Path").uri for v in paths[:2]]
    except ParseError:
        return None
    if not uris or not isinstance(uris[0], SipURI):
        return None
    pick = uris[1] if uris[0].has_param("r2") and len(uris) > 1 else uris[0]
    value = pick.param("received") if isinstance(pick, SipURI) else None
    return unquote(value.strip('"')) if value else None


def format_binding(
    binding: Binding, now: float, settings: Settings, gruu: GruuContext | None = None, cap: int | None = None
) -> str:
    """A Contact value for a 200 OK: UA URI, q, remaining expires, GRUUs, received when NATed
    (behaviour §3.5)."""
    parts = [f"<{binding.contact}>"]
    if binding.q is not None:
        parts.append(f";q={binding.q:g}")
    remaining = binding.remaining(now)
    if cap is not None:
        remaining = min(remaining, cap)
    parts.append(f";expires={remaining}")
    if gruu is not None:
        parts.append(gruu_params(binding, gruu, settings))
    if binding.reg_id is not None and binding.instance:
        # An RFC 5626 flow: the phone finds its binding by instance and reg-id (its Contact URI may differ).
        if gruu is None:
            parts.append(f';+sip.instance="{binding.instance}"')
        parts.append(f";reg-id={binding.reg_id}")
    source = binding.source
    if settings.path_received and binding.path:
        received = path_received(binding.path)
        if received:
            parts.append(f';{settings.received_param}="{received}"')
            return "".join(parts)
    hostport = _sip_hostport(binding.contact)
    if hostport is not None and (hostport[0] != source.host or (hostport[1] or 5060) != source.port):
        received = f"sip:{ip_reference(source.host)}:{source.port}{uri_transport(source.transport)}"
        parts.append(f';{settings.received_param}="{received}"')
    return "".join(parts)


def _sip_hostport(text: str) -> tuple[str, int | None] | None:
    """Host (brackets stripped) and port of a stored SIP contact URI; None when it is not a SIP URI.

    The plain ``sip:user@host:port;params`` form is split with string operations (a full parse_uri costs
    3 µs per binding listed in every 200 OK); anything else goes through :func:`parse_uri`."""
    scheme, _, rest = text.partition(":")
    if scheme in ("sip", "sips") and "?" not in rest and "[" not in rest and rest.count("@") <= 1:
        hostport = rest.rpartition("@")[2].partition(";")[0]
        host, colon, port = hostport.partition(":")
        if host and (not colon or (is_digits(port) and len(port) <= 5)):
            return host, int(port) if colon else None
    try:
        uri = parse_uri(text)
    except URIError:
        return None
    return (uri.host.strip("[]"), uri.port) if isinstance(uri, SipURI) else None


def rewrite_reply(
    reply: Response,
    record: AorRecord | None,
    now: float,
    settings: Settings,
    paths: list[str] | None = None,
    gruu: GruuContext | None = None,
    cap: int | None = None,
) -> Response:
    """The main registrar's reply as the UA sees it: our bindings, no Expires (behaviour §4.3 steps 2, 5)."""
    out = reply.copy()
    out.headers.remove("contact")
    out.headers.remove("expires")
    out.headers.remove("path")
    _add_bindings(out, record, now, settings, paths, gruu, cap)
    return out


def binding_reply(
    request: Request,
    record: AorRecord | None,
    now: float,
    settings: Settings,
    paths: list[str] | None = None,
    gruu: GruuContext | None = None,
    cap: int | None = None,
) -> Response:
    """A locally built reply listing every valid binding of this AoR, never another's
    (behaviour §3.5 [REC])."""
    out = make_response(request, 200)
    _add_bindings(out, record, now, settings, paths, gruu, cap)
    return out


def _add_bindings(
    response: Response,
    record: AorRecord | None,
    now: float,
    settings: Settings,
    paths: list[str] | None,
    gruu: GruuContext | None,
    cap: int | None,
) -> None:
    """List every valid binding and echo the Path; ``cap`` bounds the lifetimes shown (a draining process:
    architecture "Networking and flow ownership")."""
    contact = contact_value(record, now, settings, gruu, cap)
    if contact is not None:
        response.headers.add("Contact", contact)
    for value in paths or []:
        response.headers.add("Path", value)


def contact_value(
    record: AorRecord | None,
    now: float,
    settings: Settings,
    gruu: GruuContext | None = None,
    cap: int | None = None,
) -> str | None:
    """The Contact header value of a 200 OK: every valid binding of the AoR; None when there is none."""
    bindings: list[Binding] = []
    if record is not None:
        if len(record.bindings) == 1:  # the usual AoR: nothing to sort
            bindings = [b for b in record.bindings.values() if b.expires_at > now]
        else:
            bindings = record.valid_bindings(now)
    if not bindings:
        return None
    return ", ".join(format_binding(b, now, settings, gruu, cap) for b in bindings)


def with_outbound(response: Response, view: RegisterView) -> Response:
    """Add ``Require: outbound`` to a 2xx when RFC 5626 was applied to a phone that supports it (§6)."""
    if wants_outbound(view) and not has_option_tag(response.headers.values("require"), "outbound"):
        response.headers.add("Require", "outbound")
    return response


def error_reply(request: Request, error: RegistrarError, settings: Settings) -> Response:
    """A locally built error with P-Registrar-Error, and Retry-After on 5xx when configured
    (behaviour §3.5)."""
    out = make_response(request, error.status)
    out.headers.add("P-Registrar-Error", error.text)
    if error.status == 420:
        out.headers.add("Unsupported", "path")
        for value in request.headers.values("path"):
            out.headers.add("Path", value)
    if error.status >= 500 and settings.retry_after:
        out.headers.add("Retry-After", str(settings.retry_after))
    return out
