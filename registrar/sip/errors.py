"""Errors raised by the sans-IO SIP layer. Every one carries a reason fit for a 400's reason phrase."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from registrar.sip.message import Request, Response


class SipError(ValueError):
    """Base of the SIP layer's errors."""


class ParseError(SipError):
    """A message cannot be accepted.

    ``status`` is the response to send (400, or 505 for an unknown version, 513 for an oversized one) when
    the message can be answered at all; ``can_reply`` is False when no reply can be routed or sent (a
    response, an ACK, no usable top Via, or bytes that are not SIP), in which case the message is dropped.

    ``message`` is the partly parsed message when the error was found after the header fields were split
    (None otherwise): its header fields are kept as received, so ``make_response(exc.message, exc.status)``
    can build the error response without parsing anything else.
    """

    def __init__(
        self,
        reason: str,
        *,
        status: int = 400,
        can_reply: bool = True,
        message: Request | Response | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.can_reply = can_reply
        self.message = message


class FramingError(SipError):
    """A stream (TCP/TLS) cannot be split into messages any more; the transport must close the connection.

    ``status`` is the response the transport may send before closing (400, or 513 for an oversized
    message) if it can address one; most transports just close.
    """

    def __init__(self, reason: str, *, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FramingError) and (self.reason, self.status) == (other.reason, other.status)

    def __hash__(self) -> int:
        return hash((self.reason, self.status))
