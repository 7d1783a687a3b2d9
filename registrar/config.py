"""The one configuration model of the registrar.

The CLI options, the `MIDREG_*` environment variables, the `--config` YAML file and the operator's rendered
ConfigMap all pass through :class:`Settings`, so a value is validated the same way wherever it comes from.
Field names are the snake_case form of the CLI options (``--min-expires`` ↔ ``min_expires`` ↔
``MIDREG_MIN_EXPIRES``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from registrar.sip.transport import ip_reference

ENV_PREFIX = "MIDREG_"


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line meant for the operator."""


class Mode(StrEnum):
    MIRROR = "mirror"
    CONTACT = "contact"
    AOR = "aor"


class Insertion(StrEnum):
    CONTACT = "contact"
    PATH = "path"


class ContactIdInsertion(StrEnum):
    CT_PARAM = "ct-param"
    CT_USERNAME = "ct-username"


class PathMode(StrEnum):
    """How Path headers sent by the phone side are kept (behaviour §8.4)."""

    OFF = "off"
    LAZY = "lazy"
    STRICT = "strict"


class StoreKind(StrEnum):
    MEMORY = "memory"
    ETCD = "etcd"


class Transport(StrEnum):
    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"
    WS = "ws"  # SIP over WebSocket (RFC 7118): one SIP message per WebSocket message
    WSS = "wss"  # the same over TLS, with --tls-cert


# RFC 7118 names no port: these are what SIP servers commonly use for WebSocket.
DEFAULT_PORTS = {
    Transport.UDP: 5060,
    Transport.TCP: 5060,
    Transport.TLS: 5061,
    Transport.WS: 8080,
    Transport.WSS: 8443,
}


class Listen(BaseModel):
    """One listening socket, written ``udp:127.0.0.1:5060``."""

    model_config = ConfigDict(frozen=True)

    transport: Transport
    host: str
    port: int = Field(ge=1, le=65535)

    @classmethod
    def parse(cls, text: str) -> Listen:
        proto, sep, rest = text.partition(":")
        if not sep:
            raise ValueError(f"listen address {text!r} must look like udp:, tcp:, tls:, ws: or wss:HOST:PORT")
        try:
            transport = Transport(proto.lower())
        except ValueError:
            raise ValueError(
                f"listen address {text!r}: the transport must be udp, tcp, tls, ws or wss"
            ) from None
        host, port = split_hostport(rest, default_port=DEFAULT_PORTS[transport])
        return cls(transport=transport, host=host, port=port)

    def __str__(self) -> str:
        return f"{self.transport.value}:{ip_reference(self.host)}:{self.port}"


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def split_hostport(text: str, default_port: int) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after ] in {text!r}")
        port_text = rest[1:]
        if host and not _is_ipv6(host):
            raise ValueError(f"{host!r} in [] is not an IPv6 address in {text!r}")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
        if ":" in host and not _is_ipv6(host):  # (else it would be written back as another address)
            raise ValueError(f"{text!r} is neither host:port nor an IPv6 address ([v6]:port)")
    if not host:
        raise ValueError(f"missing host in {text!r}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"port in {text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} in {text!r} is out of range 1-65535")
    return host, port


class Settings(BaseModel):
    """Every setting of ``midregistrar run`` with its default (behaviour §10 names kept where they fit)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Network
    listen: list[Listen] = Field(
        default_factory=lambda: [Listen.parse("udp:0.0.0.0:5060")],
        min_length=1,
        description="Socket to listen on, TRANSPORT:HOST:PORT (udp, tcp, tls, ws, wss); repeat for several.",
    )
    tls_cert: str | None = Field(
        None,
        description="PEM certificate (chain) for tls: sockets, e.g. a Secret's tls.crt; reloaded on change.",
    )
    tls_key: str | None = Field(None, description="PEM private key of --tls-cert (tls.key).")
    tls_client_ca: str | None = Field(
        None, description="CA bundle: phones and peers on tls: sockets must show a certificate it signed."
    )
    tls_ca: str | None = Field(
        None,
        description="CA bundle that verifies TLS peers the registrar dials, the main registrar first "
        "(default: the system's). Never unverified.",
    )
    handoff_key_file: str | None = Field(
        None,
        description="File of shared keys (one per line, 16+ bytes; the first signs, all verify) that "
        "authenticate the hand-off of requests between processes (etcd store). Without it a hand-off is "
        "trusted by the sender's address. Re-read when it changes, so keys rotate without a restart.",
    )
    tls_reload_interval: float = Field(
        10.0, gt=0, description="Seconds between checks of the certificate files for a change."
    )
    advertise: str | None = Field(
        None, description="Host[:port] written into Via, Contact and Path (NAT, pods)."
    )
    main_registrar: str | None = Field(None, description="SIP URI of the main registrar/PBX (required).")
    main_proxy: str | None = Field(
        None, description="Outbound proxy toward the main registrar (behaviour §2.2 hop)."
    )
    record_route: bool = Field(
        False,
        description="Record-Route every dialog (those over a phone's TCP or NATed flow always are).",
    )
    max_connections: int = Field(
        10000,
        ge=0,
        description="Stream connections (TCP, TLS, WebSocket) a process accepts at once; beyond, new ones "
        "are closed at once and counted (0 = no limit).",
    )
    max_connections_per_source: int = Field(
        1000,
        ge=0,
        description="Stream connections a process accepts at once from one IP address; beyond, new ones from "
        "it are closed at once and counted (0 = no limit). Raise it for phones behind a carrier-grade NAT.",
    )
    source_rate_limit: int = Field(
        500,
        ge=0,
        description="Messages per second one source address may send (UDP datagrams, and messages over its "
        "stream connections), counted before any parsing; beyond, they are dropped unanswered and counted "
        "(0 = no limit). Never applies to --trusted-sources, the main registrar or the other registrar "
        "processes.",
    )
    source_block_seconds: float = Field(
        10.0,
        ge=0,
        description="A source sending ten times --source-rate-limit within one second is blocked this long "
        "by a kernel socket filter on the UDP sockets (its datagrams then cost nothing), then counted "
        "afresh; twice as long each time it is blocked again within a minute, up to 5 min (0 = never block: "
        "drop its messages one by one).",
    )
    trusted_sources: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="Addresses or CIDR networks that --source-rate-limit never limits: an SBC or "
        "carrier-grade NAT sending many phones from one address (default: loopback, a PBX in the same pod). "
        "Comma-separated or repeated; an empty value trusts none.",
    )
    new_connection_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds an accepted stream connection may stay open without carrying a SIP message "
        "(keep-alives do not count); then it is closed and counted.",
    )
    tcp_idle_timeout: float = Field(
        3600.0,
        gt=0,
        description="Seconds before an idle stream connection (TCP, TLS, WebSocket) is closed, unless a "
        "binding still needs its flow.",
    )
    udp_receive_buffer: int = Field(
        4 * 1024 * 1024, ge=0, description="SO_RCVBUF of UDP sockets, bytes (0 = the kernel's default)."
    )
    http: str | None = Field(
        None, description="HOST:PORT for /healthz, /readyz, /metrics and /v1/aors/{aor}."
    )

    # Mid-registrar behaviour (behaviour §10)
    mode: Mode = Field(Mode.MIRROR, description="mirror (relay all), contact (per-contact) or aor (per-AoR).")
    insertion: Insertion = Field(
        Insertion.CONTACT, description="contact: rewrite Contacts to point here; path: keep them, add Path."
    )
    contact_id_insertion: ContactIdInsertion = Field(
        ContactIdInsertion.CT_PARAM, description="ct-param (sip:user@mid;ctid=N) or ct-username (sip:N@mid)."
    )
    contact_id_param: str = Field("ctid", description="URI parameter that carries the contact id.")
    at_escape_str: str = Field("%40", description="How '@' of the AoR is written in mode aor's contact.")
    extra_contact_params: str = Field(
        "", description="Appended to rewritten Contact URIs, e.g. ;transport=tcp."
    )
    outgoing_expires: int = Field(
        3600, gt=0, description="Lifetime written into relayed REGISTERs (contact/aor)."
    )
    min_expires: int = Field(10, ge=0, description="Shorter non-zero lifetimes are raised to this (0 = off).")
    default_expires: int = Field(3600, ge=0, description="Lifetime when the REGISTER gives none.")
    max_expires: int = Field(3600, ge=0, description="Longer lifetimes are lowered to this (0 = off).")
    expires_max_deviation: int = Field(0, ge=0, description="Random ± spread of local lifetimes, seconds.")
    max_contacts: int = Field(0, ge=0, description="Contacts per AoR (0 = no limit); beyond: 503.")
    force_registration: bool = Field(False, description="With max-contacts: evict the oldest instead of 503.")
    retry_after: int = Field(0, ge=0, description="Retry-After on locally generated 5xx (0 = none).")
    received_param: str = Field("received", description="Contact parameter that shows a NATed source.")
    use_domain: bool = Field(True, description="The AoR is user@domain (else the user part only).")
    realm_prefix: str = Field("", description="Prefix stripped from the AoR's domain, e.g. 'sip.'.")
    case_sensitive: bool = Field(True, description="Keep the AoR user's case (the domain is always lowered).")
    allow_dup_cseq: bool = Field(False, description="Accept an equal CSeq on the same Call-ID as a refresh.")
    cseq_delay: int = Field(
        20, ge=0, description="An equal CSeq within this many seconds is a retransmission."
    )
    path_mode: PathMode = Field(
        PathMode.OFF, description="Path from the phone side: off, lazy or strict (420)."
    )
    path_received: bool = Field(False, description="Show the first Path URI's received as the binding's.")
    method_filtering: bool = Field(
        False, description="Mode aor: fork only to contacts that allow the method."
    )
    refresh_templates: int = Field(
        100_000,
        ge=0,
        description=(
            "Mode contact: phones whose repeated refresh is answered from a template without parsing "
            "(about 2.5 KB each; 0 = off)."
        ),
    )
    register_rate_limit: float = Field(
        0.0, ge=0, description="Locally answered REGISTERs per second per source address (0 = no limit)."
    )
    auth_file: str | None = Field(
        None, description="user:password file: digest-authenticate REGISTERs before absorbing them."
    )
    auth_realm: str = Field("midregistrar", description="Realm of the local digest challenge.")
    auth_failure_limit: int = Field(
        5,
        ge=0,
        description="Wrong digest answers from one source address, or for one user, before the local gate "
        "refuses further attempts with 503 and Retry-After for a back-off window (2 s, doubling while it "
        "goes on, up to 5 min); while a user is in back-off each source may still try once per window "
        "(0 = no back-off).",
    )
    main_credentials: list[str] = Field(
        default_factory=list, description="realm:user:password answering challenges to De-REGISTERs; repeat."
    )
    gruu: bool = Field(False, description="Issue GRUUs (RFC 5627) to UAs that send Supported: gruu.")
    gruu_secret: str = Field("0p3nS1pS", min_length=1, description="Key for temporary GRUUs.")
    raise_on_423: bool = Field(False, description="On 423 above outgoing-expires: raise it and retry once.")

    # Shutdown
    drain_grace: float = Field(
        0.0, ge=0, description="Seconds to keep serving after SIGTERM, answering with drain-expires."
    )
    drain_expires: int = Field(
        30, ge=1, description="Lifetime shown to phones while draining, so they re-register elsewhere."
    )
    drain_timeout: float = Field(
        10.0, ge=0, description="Longest wait for transactions still open after the grace period."
    )

    # SIP timers (RFC 3261 §17), seconds
    t1: float = Field(0.5, gt=0, description="RFC 3261 T1 (retransmission base; timeouts are 64*T1).")
    t2: float = Field(4.0, gt=0, description="RFC 3261 T2 (retransmission cap).")
    t4: float = Field(5.0, gt=0, description="RFC 3261 T4 (how long a message lingers in the network).")

    # State
    store: StoreKind = Field(StoreKind.MEMORY, description="memory (one process) or etcd (shared by pods).")
    etcd_endpoints: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:2379"], description="etcd HOST:PORT; repeat or comma-separate."
    )
    etcd_prefix: str = Field(
        "/midregistrar/default/default/", description="Key prefix of this registrar in etcd."
    )
    etcd_ca_file: str | None = Field(
        None, description="CA bundle that signs etcd's server certificate (TLS)."
    )
    etcd_cert_file: str | None = Field(None, description="Client certificate for etcd (mutual TLS).")
    etcd_key_file: str | None = Field(None, description="Private key of the etcd client certificate.")
    etcd_username: str | None = Field(None, description="etcd user (etcd authentication).")
    etcd_password: str | None = Field(None, description="Password of the etcd user.")
    etcd_timeout: float = Field(
        2.0, gt=0, description="Deadline of one etcd call; past it etcd counts as unavailable (503)."
    )
    etcd_hold: int = Field(
        600,
        ge=5,
        description="How far past the phone's expiry a binding's etcd lease reaches at most: the owner "
        "rewrites a binding only when that lease would lapse (each binding at its own point of a "
        "--etcd-hold less 10 % cycle, so phones that came together do not renew together), so a refresh "
        "costs no etcd call; also how long a binding can outlive a dead owner.",
    )
    member_ttl: int = Field(
        10, ge=2, description="TTL of this process's liveness lease in etcd (peers see it gone after that)."
    )
    internal_address: str | None = Field(
        None,
        description="TRANSPORT:HOST:PORT peers use to hand this process requests for the flows it holds "
        "(default: the first listen socket, with the advertised host).",
    )

    # Logging
    log_format: Literal["text", "json"] = Field("text", description="text or json (one object per line).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    @field_validator("listen", mode="before")
    @classmethod
    def _parse_listen(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [Listen.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("main_credentials", mode="before")
    @classmethod
    def _parse_credentials(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        for item in value if isinstance(value, list) else []:  # (anything else: the type check says so)
            if isinstance(item, str) and item.count(":") < 2:
                raise ValueError(f"credentials {item.split(':')[0]!r}… must look like realm:user:password")
        return value

    @field_validator("trusted_sources", mode="before")
    @classmethod
    def _parse_trusted(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            items = [part.strip() for v in value for part in str(v).split(",") if part.strip()]
            for item in items:
                try:
                    ipaddress.ip_network(item.strip("[]"), strict=False)
                except ValueError:
                    raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
            return items
        return value

    @field_validator("etcd_endpoints", mode="before")
    @classmethod
    def _parse_endpoints(cls, value: Any) -> Any:
        """Comma-separated in one value (the environment) or in each repeated flag (the CLI)."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [e.strip() for v in value for e in v.split(",") if e.strip()]
        return value

    @field_validator("main_registrar", "main_proxy")
    @classmethod
    def _check_main(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from registrar.sip.uri import URIError, parse_uri  # local: the SIP layer imports nothing from here

        try:
            uri = parse_uri(value)
        except URIError as exc:
            raise ValueError(f"not a SIP URI: {value!r} ({exc})") from None
        if uri.scheme not in ("sip", "sips"):
            raise ValueError(f"main registrar must be a sip: URI, got {value!r}")
        return value

    @field_validator("http")
    @classmethod
    def _check_http(cls, value: str | None) -> str | None:
        if value:
            split_hostport(value, default_port=9090)
        return value or None

    @field_validator("advertise")
    @classmethod
    def _check_advertise(cls, value: str | None) -> str | None:
        if value:
            split_hostport(value, default_port=5060)
        return value or None

    @field_validator("internal_address")
    @classmethod
    def _check_internal(cls, value: str | None) -> str | None:
        if value:
            Listen.parse(value)
        return value or None

    @field_validator("contact_id_param")
    @classmethod
    def _check_param(cls, value: str) -> str:
        if not value or any(c not in _TOKEN_CHARS for c in value):
            raise ValueError(f"{value!r} is not a valid URI parameter name")
        return value

    @field_validator("at_escape_str")
    @classmethod
    def _check_escape(cls, value: str) -> str:
        if not value or any(c not in _USER_CHARS for c in value):
            raise ValueError(f"{value!r} must be made of characters valid in a SIP URI user part")
        return value

    @field_validator("extra_contact_params")
    @classmethod
    def _check_extra(cls, value: str) -> str:
        if value and not value.startswith(";"):
            raise ValueError(f"extra contact params must start with ';', got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_insertion(self) -> Settings:
        if self.insertion is Insertion.PATH and self.mode is Mode.AOR:
            raise ValueError(
                "insertion path keeps each phone's Contact: it works with modes mirror and contact"
            )
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if any(item.transport in (Transport.TLS, Transport.WSS) for item in self.listen) and not (
            self.tls_cert and self.tls_key
        ):
            raise ValueError(
                "a tls: or wss: listen socket needs tls_cert and tls_key (the certificate and its key)"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @model_validator(mode="after")
    def _check_expires(self) -> Settings:
        if self.max_expires and self.min_expires > self.max_expires:
            raise ValueError(f"min_expires {self.min_expires} is above max_expires {self.max_expires}")
        if self.default_expires < self.min_expires or (
            self.max_expires and self.default_expires > self.max_expires
        ):
            raise ValueError(
                f"default_expires {self.default_expires} must lie within "
                f"[min_expires {self.min_expires}, max_expires {self.max_expires}]"
            )
        return self

    def to_file_dict(self) -> dict[str, Any]:
        """The YAML form read back by ``--config`` (used by the operator's ConfigMap)."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["listen"] = [str(item) for item in self.listen]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_file_dict(), sort_keys=True)

    def advertised_host(self, listen: Listen) -> tuple[str, int]:
        """The host and port written into Contact/Via/Record-Route for a socket."""
        if self.advertise:
            return split_hostport(self.advertise, default_port=listen.port)
        host = listen.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return host, listen.port


_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
_USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()&=+$,;?/%")


def field_names() -> list[str]:
    return list(Settings.model_fields)


def env_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """Values from ``MIDREG_<OPTION>`` variables (strings; the model parses them)."""
    known = set(field_names())
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in known:
                out[name] = value
    return out


# Settings nest two levels at most (a list of strings under a key): a file nested much deeper is refused
# before PyYAML's recursive composer spends a second and then raises RecursionError, and before its scanner
# spends time quadratic in the depth of ``[``/``{`` (found by tests/fuzz).
MAX_YAML_DEPTH = 32
_FLOW_BRACKETS = re.compile(r"[\[\]{}]").finditer


def _flow_depth(text: str) -> int:
    """How deep ``[`` and ``{`` nest (quoting ignored: an upper bound of YAML's flow depth, unless brackets
    inside strings close more than they open)."""
    depth = deepest = 0
    for m in _FLOW_BRACKETS(text):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif depth:
            depth -= 1
    return deepest


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing documents nested deeper than :data:`MAX_YAML_DEPTH`."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def file_settings(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
        if _flow_depth(text) > MAX_YAML_DEPTH:
            raise yaml.YAMLError(f"[ and {{ nested deeper than {MAX_YAML_DEPTH} levels")
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:  # a scalar YAML reads but Python will not take: an integer of 5,000 digits
        raise ConfigError(f"config file {path} holds a value that cannot be read: {str(exc)[:80]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_settings(
    options: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Merge file < environment < options and validate; raise ConfigError with a one-line reason."""
    merged: dict[str, Any] = {}
    env = dict(os.environ if environ is None else environ)
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        merged.update(file_settings(path))
    merged.update(env_settings(env))
    merged.update({k: v for k, v in (options or {}).items() if v is not None})
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc)) from None


def describe_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "settings"
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid {where.replace('_', '-')}: {message}"


__all__ = [
    "ConfigError",
    "ContactIdInsertion",
    "Insertion",
    "Listen",
    "Mode",
    "PathMode",
    "Settings",
    "StoreKind",
    "Transport",
    "build_settings",
    "split_hostport",
]
