"""The member registry: which registrar processes are alive, and where to hand them a request.

Every process puts ``members/<member id>`` (its internal SIP address) on a liveness lease it keeps alive;
a binding's ``owner`` is such an id. A peer that sees the key go (revoked on shutdown, or the lease ran out
when the process died) stops handing requests to it, and the bindings it owned run out their own leases
into orphan claims (registrar/store/orphans.py).

The key also carries the writer's wall clock, written again now and then (``announce``): binding expiries,
orphan claims and signed hand-offs are wall-clock times read by other processes, so a peer whose clock
differs from ours by more than ``SKEW_WARN`` is logged and shown (``skew()``, a gauge), rather than leaving
expiries silently early or late. The offset a put shows includes the watch's delivery delay (milliseconds);
a put replayed late would look like a peer behind: puts in the first seconds after the watch (re)connects
(a backlog, e.g. after a cut) are no samples, and a skew counts once two puts in a row agree on its sign, at
the smaller of the two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from registrar.store.etcd_client import EtcdClient
from registrar.store.etcd_layout import UNDECODABLE, EtcdKeys, decode_member, encode_member, member_clock, why

log = logging.getLogger(__name__)

SKEW_WARN = 1.0  # s: a peer's clock this far from ours is logged
ANNOUNCE_FIRST = 5.0  # s between the first two announcements after registering
ANNOUNCE_EVERY = 30.0  # s: then this often


class MemberRegistry:
    """This process's member key and lease, and the live members as etcd last showed them. ``calls``
    counts the etcd requests made (listings, grants, puts, keepalives)."""

    def __init__(
        self,
        client: EtcdClient,
        keys: EtcdKeys,
        member_id: str,
        ttl: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.keys = keys
        self.member_id = member_id
        self.ttl = ttl
        self.clock = clock
        self.address = ""
        self.lease = 0
        self.calls = 0
        self._live: dict[str, str] = {}
        self.announced = 0  # announcements since the last registration
        self._offsets: dict[str, tuple[float, ...]] = {}  # member → its last two clock offsets from ours
        self._warned: dict[str, int] = {}  # member → the skew (whole seconds) last logged

    def address_of(self, member: str) -> str | None:
        return self._live.get(member)

    def live(self) -> dict[str, str]:
        """Live members: id → internal SIP address."""
        return dict(self._live)

    async def list(self) -> int:
        """Read every member key; returns the revision read at (a watch from the next one misses nothing)."""
        self.calls += 1
        page = await self.client.get_prefix(self.keys.members)
        live: dict[str, str] = {}
        for kv in page.kvs:
            try:
                member = kv.key[len(self.keys.members) :].decode()
                live[member] = decode_member(kv.value)
            except UNDECODABLE as exc:
                log.warning("member key %r in etcd not understood, skipped: %s", kv.key, why(exc))
        self._live = live
        return page.revision

    async def register(self) -> int:
        """Put this member's key on a fresh liveness lease (same member id after an outage). Returns the
        lease it replaces (0: none), for the caller to revoke."""
        self.calls += 2
        lease = await self.client.grant(self.ttl)
        value = encode_member(self.address, self.clock())
        await self.client.put(self.keys.member(self.member_id), value, lease=lease)
        old, self.lease = self.lease, lease
        self.announced = 0
        self._live[self.member_id] = self.address
        return old if old != lease else 0

    async def keepalive(self) -> bool:
        """Renew the lease once; False when etcd had already let it go (register again)."""
        self.calls += 1
        return await self.client.keepalive_once(self.lease) > 0

    async def announce(self) -> None:
        """Write the member key again with our clock, on the same lease (peers measure the skew)."""
        self.calls += 1
        value = encode_member(self.address, self.clock())
        await self.client.put(self.keys.member(self.member_id), value, lease=self.lease)
        self.announced += 1

    def announce_interval(self) -> float:
        """Seconds until the next announcement: two soon after registering (a peer that started with us
        listed our first put instead of watching it, and needs two), then every ``ANNOUNCE_EVERY``."""
        return ANNOUNCE_FIRST if self.announced < 2 else ANNOUNCE_EVERY

    def put(self, member: str, value: bytes, fresh: bool = True) -> None:
        """A member key written (watch); ``fresh``: delivered as it happened, so its clock is a sample (not
        replayed from a backlog after the watch reconnected)."""
        try:
            self._live[member] = decode_member(value)
        except UNDECODABLE as exc:
            log.warning("member %r written in etcd not understood, skipped: %s", member, why(exc))
            return
        clock = member_clock(value)
        if clock is not None and fresh and member != self.member_id:
            self._observe(member, clock - self.clock())

    def gone(self, member: str) -> None:
        """A member key deleted (watch): revoked, or its lease ran out."""
        self._live.pop(member, None)
        self._offsets.pop(member, None)
        self._warned.pop(member, None)

    def _observe(self, member: str, offset: float) -> None:
        samples = (*self._offsets.get(member, ())[-1:], offset)
        self._offsets[member] = samples
        agreed = _agreed(samples)
        if agreed is None:
            return
        if abs(agreed) > SKEW_WARN:
            if self._warned.get(member) != round(agreed):
                self._warned[member] = round(agreed)
                log.warning(
                    "clock of member %s is %+.1f s from ours: binding expiries, orphan claims and hand-off "
                    "signatures are read across processes by wall clock; synchronise the clocks (NTP)",
                    member,
                    agreed,
                )
        elif self._warned.pop(member, None) is not None:
            log.info("clock of member %s agrees with ours again (%+.2f s)", member, agreed)

    def offset(self, member: str) -> float:
        """Seconds ``member``'s clock is ahead of ours, once two puts agree (0 until then)."""
        return _agreed(self._offsets.get(member, ())) or 0.0

    def skew(self) -> float:
        """The largest clock offset (seconds, absolute) to a live peer that two puts agree on; 0 when none."""
        found = (_agreed(s) for m, s in self._offsets.items() if m in self._live)
        return max((abs(a) for a in found if a is not None), default=0.0)


def _agreed(samples: tuple[float, ...]) -> float | None:
    """Two offsets of the same sign: the one nearer zero (a put delivered late cannot fake a skew alone)."""
    if len(samples) < 2 or (samples[0] > 0) != (samples[1] > 0):
        return None
    return min(samples, key=abs)
