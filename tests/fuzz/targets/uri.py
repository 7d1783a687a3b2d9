"""URI and header-field parsers: ``parse_uri``, ``parse_address``, ``parse_via`` / ``parse_via_sent_by``,
``parse_cseq``, ``parse_params``, ``split_commas`` + ``parse_contacts``. Each may raise only URIError or
ParseError; what they accept must print (``str``) and compare (``equals``) without raising, and a SIP URI
printed from its parts must parse again to an equal URI.
"""

from __future__ import annotations

import contextlib

from registrar.sip.errors import ParseError
from registrar.sip.headers import (
    parse_address,
    parse_contacts,
    parse_cseq,
    parse_params,
    parse_via,
    parse_via_sent_by,
    split_commas,
    unquote,
)
from registrar.sip.transport import peer_for_uri
from registrar.sip.uri import SipURI, URIError, parse_uri
from tests.fuzz.harness import Target


def _uri(text: str) -> None:
    try:
        uri = parse_uri(text)
    except URIError:
        return
    assert uri.equals(uri), text
    str(uri)
    if isinstance(uri, SipURI):
        uri.transport  # noqa: B018
        rebuilt = uri.replace()  # printed from its parts, not the text kept
        again = parse_uri(str(rebuilt))
        assert again.equals(uri), (text, str(rebuilt))
        with contextlib.suppress(ValueError):
            peer_for_uri(uri)


def _header(text: str) -> None:
    try:
        address = parse_address(text)
    except ParseError:
        pass
    else:
        str(address)
        address.tag  # noqa: B018
        address.uri.equals(address.uri)
    for value in (text, text.partition(",")[0]):
        try:
            via = parse_via(value)
        except ParseError:
            pass
        else:
            str(via)
            via.branch, via.received  # noqa: B018
        with contextlib.suppress(ParseError):
            parse_via_sent_by(value)
    try:
        for contact in parse_contacts(split_commas(text)):
            contact.q, contact.instance, contact.expires  # noqa: B018
    except ParseError:
        pass
    try:
        cseq = parse_cseq(text)
        str(cseq)
    except ParseError:
        pass
    try:
        for _name, param in parse_params(text, "fuzz"):
            unquote(param)
    except ParseError:
        pass


def run(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    _uri(text)
    _header(text)


TARGET = Target("uri", run, (), __doc__ or "")
