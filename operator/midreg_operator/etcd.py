"""The registrar's etcd, seen by the operator through etcd's v3 HTTP/JSON gateway.

Two jobs: delete a MidRegistrar's key prefix (finalizer) and count its AoRs and contacts (status). The keys
are the registrar's own (registrar/store/etcd_layout.py, which imports no gRPC): this module only reads them.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from registrar.store.etcd_layout import EtcdKeys, KeyKind, prefix_range_end

COUNT_LIMIT = 200_000


class EtcdUnavailable(Exception):
    """No endpoint answered (or every one refused the request)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def endpoint_url(endpoint: str, tls: bool) -> str:
    if endpoint.startswith(("http://", "https://")):
        return endpoint.rstrip("/")
    return f"{'https' if tls else 'http'}://{endpoint}"


@dataclass(frozen=True)
class Counts:
    aors: int
    contacts: int


def count_keys(keys: list[bytes], prefix: bytes) -> Counts:
    """Classify keys under prefix: AoR records and their contact bindings (other records ignored)."""
    layout = EtcdKeys(prefix)
    kinds = [parsed.kind for parsed in map(layout.parse, keys) if parsed is not None]
    return Counts(aors=kinds.count(KeyKind.HEAD), contacts=kinds.count(KeyKind.BINDING))


@dataclass
class EtcdGateway:
    endpoints: list[str]
    timeout: float = 3.0
    ca_data: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    _token: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return bool(self.ca_data or self.cert_file) or any(e.startswith("https://") for e in self.endpoints)

    def _context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = (
            ssl.create_default_context(cadata=self.ca_data) if self.ca_data else ssl.create_default_context()
        )
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def _post(self, base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = self._token
        req = urllib.request.Request(
            base + path, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(req, timeout=self.timeout, context=self._context()) as resp:
            data: dict[str, Any] = json.loads(resp.read() or b"{}")
            return data

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors: list[str] = []
        for endpoint in self.endpoints:
            base = endpoint_url(endpoint, self.tls)
            try:
                if self.username and not self._token:
                    auth = self._post(
                        base,
                        "/v3/auth/authenticate",
                        {"name": self.username, "password": self.password or ""},
                    )
                    self._token = str(auth.get("token", "")) or None
                return self._post(base, path, body)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                errors.append(f"{endpoint}: {reason}")
        raise EtcdUnavailable("; ".join(errors) or "no etcd endpoint configured")

    def delete_prefix(self, prefix: str) -> int:
        key = prefix.encode()
        data = self.call("/v3/kv/deleterange", {"key": _b64(key), "range_end": _b64(prefix_range_end(key))})
        return int(data.get("deleted", 0))

    def counts(self, prefix: str) -> Counts | None:
        """AoR and contact counts, or None when there are more keys than COUNT_LIMIT (then unknown)."""
        key = EtcdKeys(prefix.encode()).aors
        data = self.call(
            "/v3/kv/range",
            {
                "key": _b64(key),
                "range_end": _b64(prefix_range_end(key)),
                "keys_only": True,
                "limit": COUNT_LIMIT,
            },
        )
        if data.get("more"):
            return None
        keys = [base64.b64decode(kv["key"]) for kv in data.get("kvs", [])]
        return count_keys(keys, prefix.encode())

    def put(self, key: str, value: str) -> None:
        """Used by tests and the benchmark to seed records."""
        self.call("/v3/kv/put", {"key": _b64(key.encode()), "value": _b64(value.encode())})
