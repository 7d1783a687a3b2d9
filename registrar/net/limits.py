"""Guards against connection floods: which accepted stream connections (TCP, TLS, WebSocket) a process keeps.

A phone holds one connection for hours; a flood opens thousands and sends nothing. The process refuses a new
connection beyond ``--max-connections`` in all or ``--max-connections-per-source`` from one address (so one
host cannot take every slot from the honest phones), and closes one that has sent no SIP message within
``--new-connection-timeout`` (the shell's idle sweep). Plain bookkeeping, no I/O: the shell calls it on accept
and on close.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["REFUSALS", "TIMEOUTS", "Admission"]

REFUSALS = ("max_connections", "per_source")  # label values of midregistrar_connections_refused_total
TIMEOUTS = ("first_message", "idle")  # label values of midregistrar_connections_timed_out_total


@dataclass
class Admission:
    """Counts accepted connections by source address and says which new ones to refuse."""

    max_connections: int  # 0: no limit
    per_source: int  # 0: no limit
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSALS, 0))
    timed_out: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIMEOUTS, 0))
    _sources: dict[str, int] = field(default_factory=dict)

    def admit(self, host: str, open_now: int) -> str | None:
        """Take a connection accepted from ``host`` with ``open_now`` connections already held (handshakes
        included): None when it may stay (it is counted until :meth:`release`), else the reason it is refused
        (counted)."""
        reason = None
        if self.max_connections and open_now >= self.max_connections:
            reason = "max_connections"
        elif self.per_source and self._sources.get(host, 0) >= self.per_source:
            reason = "per_source"
        if reason is not None:
            self.refused[reason] += 1
            return reason
        self._sources[host] = self._sources.get(host, 0) + 1
        return None

    def release(self, host: str) -> None:
        """A connection :meth:`admit` took has closed (or its handshake failed)."""
        left = self._sources.get(host, 0) - 1
        if left > 0:
            self._sources[host] = left
        else:
            self._sources.pop(host, None)

    def from_source(self, host: str) -> int:
        return self._sources.get(host, 0)

    def close_for_silence(self, phase: str) -> None:
        """Count a connection closed because it sent nothing: before its first message, or for too long."""
        self.timed_out[phase] += 1
