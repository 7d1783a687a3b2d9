"""HTTP digest for SIP (RFC 2617 / RFC 3261 §22.4), MD5 with qop=auth or none.

The client side answers a main registrar's challenge to a generated De-REGISTER (T57); the server side
is the optional local gate in front of absorbed REGISTERs (behaviour §11, T55). Nonces are HMACs of a
timestamp under a per-process secret, so verifying one needs no state.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass

from registrar.sip.headers import unquote


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8", "surrogateescape")).hexdigest()


def parse_challenge(value: str) -> dict[str, str]:
    """``Digest realm="x", nonce="y", qop="auth"`` → {"realm": "x", ...} (scheme checked by caller)."""
    scheme, _, rest = value.strip().partition(" ")
    out: dict[str, str] = {"scheme": scheme.lower()}
    for part in _split(rest):
        name, eq, raw = part.partition("=")
        if eq:
            out[name.strip().lower()] = unquote(raw.strip()) or ""
    return out


def _split(text: str) -> list[str]:
    parts, depth, start = [], False, 0
    for i, c in enumerate(text):
        if c == '"':
            depth = not depth
        elif c == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


class Verdict(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    STALE = "stale"
    WRONG = "wrong"


@dataclass(frozen=True, slots=True)
class Credentials:
    realm: str
    username: str
    password: str


def authorization(
    challenge: dict[str, str], creds: Credentials, method: str, uri: str, cnonce: str, nc: int = 1
) -> str:
    """The Authorization / Proxy-Authorization value answering a challenge."""
    ha1 = _md5(f"{creds.username}:{challenge.get('realm', creds.realm)}:{creds.password}")
    ha2 = _md5(f"{method}:{uri}")
    nonce = challenge.get("nonce", "")
    qops = [q.strip() for q in challenge.get("qop", "").split(",") if q.strip()]
    fields = [
        f'username="{creds.username}"',
        f'realm="{challenge.get("realm", creds.realm)}"',
        f'nonce="{nonce}"',
        f'uri="{uri}"',
    ]
    if "auth" in qops:
        ncs = f"{nc:08x}"
        response = _md5(f"{ha1}:{nonce}:{ncs}:{cnonce}:auth:{ha2}")
        fields += [f'response="{response}"', "qop=auth", f"nc={ncs}", f'cnonce="{cnonce}"']
    else:
        fields.append(f'response="{_md5(f"{ha1}:{nonce}:{ha2}")}"')
    fields.append("algorithm=MD5")
    if "opaque" in challenge:
        fields.append(f'opaque="{challenge["opaque"]}"')
    return "Digest " + ", ".join(fields)


class DigestGate:
    """Local digest check with stateless nonces (valid for ``nonce_ttl`` seconds)."""

    def __init__(
        self, realm: str, passwords: dict[str, str], secret: bytes, nonce_ttl: float = 300.0
    ) -> None:
        self.realm = realm
        self.passwords = passwords
        self.secret = secret
        self.nonce_ttl = nonce_ttl

    def nonce(self, now: float) -> str:
        stamp = f"{int(now):x}"
        mac = hmac.new(self.secret, stamp.encode(), hashlib.sha256).hexdigest()[:24]
        return f"{stamp}.{mac}"

    def challenge(self, now: float) -> str:
        return f'Digest realm="{self.realm}", nonce="{self.nonce(now)}", qop="auth", algorithm=MD5'

    def _nonce_age(self, nonce: str, now: float) -> float | None:
        """Seconds since we issued ``nonce``; None when we did not issue it."""
        stamp, _, mac = nonce.partition(".")
        try:
            issued = int(stamp, 16)
        except ValueError:
            return None
        good = hmac.new(self.secret, stamp.encode(), hashlib.sha256).hexdigest()[:24]
        return now - issued if hmac.compare_digest(good, mac) else None

    def verify(self, header: str | None, method: str, to_user: str, now: float) -> bool:
        """True when the header answers our challenge with the right password for the To user."""
        return self.check(header, method, to_user, now) is Verdict.OK

    def check(self, header: str | None, method: str, to_user: str, now: float) -> Verdict:
        """What the Authorization header is worth: OK; MISSING (none: challenge it); STALE (our nonce, past
        its lifetime: an honest phone that waited, challenged afresh); WRONG (anything else: a wrong
        password, another user, a forged nonce: what a brute force sends, counted by the gate)."""
        if not header:
            return Verdict.MISSING
        fields = parse_challenge(header)
        username = fields.get("username", "")
        password = self.passwords.get(username)
        if (
            fields.get("scheme") != "digest"
            or password is None
            or username != to_user
            or fields.get("realm") != self.realm
        ):
            return Verdict.WRONG
        nonce = self._nonce_age(fields.get("nonce", ""), now)
        if nonce is None:
            return Verdict.WRONG
        if not 0 <= nonce <= self.nonce_ttl:
            return Verdict.STALE
        ha1 = _md5(f"{username}:{self.realm}:{password}")
        ha2 = _md5(f"{method}:{fields.get('uri', '')}")
        if fields.get("qop") == "auth":
            expected = _md5(
                f"{ha1}:{fields['nonce']}:{fields.get('nc', '')}:{fields.get('cnonce', '')}:auth:{ha2}"
            )
        else:
            expected = _md5(f"{ha1}:{fields['nonce']}:{ha2}")
        return Verdict.OK if hmac.compare_digest(expected, fields.get("response", "")) else Verdict.WRONG


def load_passwords(path: str) -> dict[str, str]:
    """A credentials file: one ``user:password`` per line; blank lines and ``#`` comments ignored."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user:
                raise ValueError(f"{path}:{number}: expected user:password")
            out[user] = password
    return out


__all__ = ["Credentials", "DigestGate", "Verdict", "authorization", "load_passwords", "parse_challenge"]
