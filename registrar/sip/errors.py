"""Errors raised by the sans-IO SIP layer. Every one carries a reason fit for a 400's reason phrase."""

from __future__ import annotations


class SipError(ValueError):
    """Base of the SIP layer's errors."""


class ParseError(SipError):
    """A message cannot be accepted.

    ``status`` is the response to send (400, or 505 for an unknown version, 413 for an oversized one) when
    the message can be answered at all; ``can_reply`` is False when not enough of it parsed to route a reply
    (no usable Via, a response, or bytes that are not SIP), in which case the message is dropped.
    """

    def __init__(self, reason: str, *, status: int = 400, can_reply: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.can_reply = can_reply
