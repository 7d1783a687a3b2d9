"""Repeated refreshes answered from a template (issue 14): the absorbed refresh without the parser.

A phone refreshes with the same REGISTER every time but for its top Via branch, its CSeq number and often
its From tag. When the full pipeline (:mod:`registrar.core.registration`) absorbs a refresh in mode contact,
this module keeps, for that phone's flow, the datagram cut around those values and the 200 OK cut around the
values that change in it (branch, From tag, To tag, CSeq, Contact). The next datagram from the same flow
that equals the template byte for byte outside those values is the same request as far as every rule is
concerned (none reads the From tag), so it is
decided here from the stored binding with the same functions the pipeline uses (CSeq order, the absorb
checks of behaviour §5.2 and §11, the rate limit, the commit, the Contact list) and answered by filling the
template: no parse, no Request or transaction object. Anything else, and every refusal, goes to the full
pipeline, which answers it exactly as before; a template is only ever a shortcut to the same answer.

Not templated (the full pipeline handles them every time): modes mirror and aor, a digest gate (the
Authorization changes per request, and a replay must never pass), randomised lifetimes, GRUUs, a draining
process, more than one contact or Via, a body, a To tag in the request, or a branch without the RFC 3261
magic cookie.
"""

from __future__ import annotations

import re
from functools import partial

from registrar.config import Insertion, Mode
from registrar.core import register as reg
from registrar.core.gate import RateLimiter
from registrar.core.policy import RegistrarError
from registrar.core.reply import contact_value
from registrar.core.state import CoreState
from registrar.core.throttle import refresh_refusal, refreshed
from registrar.records import AorRecord
from registrar.sip.headers import MAGIC_COOKIE
from registrar.sip.message import Response, header_key
from registrar.sip.stack import IncomingRequest
from registrar.sip.transport import Peer
from registrar.store.base import Pending, StoreUnavailable

# What a branch value (RFC 3261 §25.1 token characters) and a CSeq number may hold.
_TOKEN_RUN = re.compile(rb"[-.!%*_+`'~0-9A-Za-z]*")
_DIGIT_RUN = re.compile(rb"[0-9]*")
_MAX_BRANCH = 256
# Checking the values while learning (never on the hot path): the branch of a Via line and the number of a
# CSeq line must each occur exactly once, where :func:`split` found them, and agree with the parser.
_BRANCH = re.compile(rb"\r\n(?:via|v)[ \t]*:[^\r\n]*?;[ \t]*branch[ \t]*=[ \t]*([^;,\s]+)", re.IGNORECASE)
_CSEQ = re.compile(rb"\r\ncseq[ \t]*:[ \t]*([0-9]+)", re.IGNORECASE)
# The slots of a reply template.
BRANCH, TAG, CSEQ, CONTACT, FROM_TAG = range(5)

Shape = tuple[bytes, ...]  # a request outside its branch, From tag (when cut there) and CSeq number


def split(data: bytes) -> tuple[Shape, bytes, bytes, bytes | None] | None:
    """A request cut around the value of its first ``;branch=``, the number of the first ``CSeq:`` line after
    it and, when a ``From:`` line between them has one, its ``;tag=`` (many phones draw a new From tag for
    every REGISTER, RFC 3261 §8.1.1.3): (shape, branch, number, From tag or None), or None. Two requests with
    the same shape differ only in those values; each value is the longest run of the characters it may
    hold, so the byte after it, which begins the next piece, ends it in both."""
    at = data.find(b";branch=")
    if at < 0:
        return None
    start = at + 8
    end = _TOKEN_RUN.match(data, start).end()  # type: ignore[union-attr]  # matches the empty run
    at = data.find(b"\r\nCSeq: ", end)
    if at < 0 or end == start:
        return None
    number_at = at + 8
    number_end = _DIGIT_RUN.match(data, number_at).end()  # type: ignore[union-attr]
    if number_end == number_at:
        return None
    branch, number = data[start:end], data[number_at:number_end]
    line = data.find(b"\r\nFrom: ", end, at)
    if line >= 0:
        tag_at = data.find(b";tag=", line + 8, data.find(b"\r\n", line + 8)) + 5
        if tag_at > 4:
            tag_end = _TOKEN_RUN.match(data, tag_at).end()  # type: ignore[union-attr]
            if tag_end > tag_at:
                shape = (data[:start], data[end:tag_at], data[tag_end:number_at], data[number_end:])
                return shape, branch, number, data[tag_at:tag_end]
    return (data[:start], data[end:number_at], data[number_end:]), branch, number, None


Cut = tuple[tuple[bytes, ...], tuple[int, ...]]  # bytes cut at slots: (pieces, slots), pieces around slots


def fill(cut: Cut, values: tuple[bytes, ...]) -> bytes:
    """A reply cut at its slots with ``values[slot]`` in each (four or five: one join either way)."""
    if len(cut[1]) == 5:
        (p0, p1, p2, p3, p4, p5), (s0, s1, s2, s3, s4) = cut
        return b"".join((p0, values[s0], p1, values[s1], p2, values[s2], p3, values[s3], p4, values[s4], p5))
    (p0, p1, p2, p3, p4), (s0, s1, s2, s3) = cut
    return b"".join((p0, values[s0], p1, values[s1], p2, values[s2], p3, values[s3], p4))


def cut(data: bytes, found: list[tuple[int, int, int]]) -> Cut:
    """``data`` cut at ``found``: (start, end, slot) spans that do not overlap."""
    pieces: list[bytes] = []
    slots: list[int] = []
    pos = 0
    for start, end, slot in sorted(found):
        if start < pos:
            raise ValueError("overlapping slots")
        pieces.append(data[pos:start])
        slots.append(slot)
        pos = end
    pieces.append(data[pos:])
    return tuple(pieces), tuple(slots)


# A template is a plain tuple of str, bytes, numbers and tuples of them, which the cyclic GC stops tracking at
# its first collection: a process may hold hundreds of thousands, and none of them may lengthen a full
# collection (registrar/app.py). Its fields, in order:
Template = tuple[
    Cut,  # the 200 OK cut at slots BRANCH, TAG, CSEQ, CONTACT
    str,  # AoR
    int,  # contact id
    int,  # the lifetime granted (behaviour §3.3: the request's, clamped)
    float | None,  # q
    tuple[str, ...],  # Path
    str | None,  # User-Agent
    str,  # Call-ID
    str,  # the Via's host, lower case, and
    str,  # its port as written: with the branch, the transaction key
    tuple[str, str, int, int | None, int] | None,  # where the answer goes when not back to the source
    str,  # the binding's contact, and its Contact value in a 200 OK when it is the AoR's only binding, cut
    tuple[bytes, bytes] | None,  # around its expires (format_binding's output for this contact and flow)
]
# The key: the flow (transport, host, port, connection, local socket) and the shape.
Key = tuple[str | int | bytes | None, ...]


def _peer_fields(peer: Peer) -> tuple[str, str, int, int | None, int]:
    return peer.transport, peer.host, peer.port, peer.conn, peer.local


class RefreshTemplates:
    """The templates of one process, keyed by flow (source address and port, or connection) and shape, so
    that many phones behind one address (a session border controller) each have theirs. At most ``limit``;
    the oldest goes first when a new one needs room."""

    def __init__(self, state: CoreState, limiter: RateLimiter | None, digest: bool, limit: int) -> None:
        self.state = state
        self.limiter = limiter
        settings = state.settings
        self.enabled = (
            limit > 0
            and settings.mode is Mode.CONTACT
            and not digest
            and not settings.gruu
            and not settings.expires_max_deviation
        )
        self.limit = limit
        self._me = state.store.member_id if settings.insertion is Insertion.PATH else None
        self._templates: dict[Key, Template] = {}
        self._of_binding: dict[int, Key] = {}  # contact id → its template's key: one template per binding

    def __len__(self) -> int:
        return len(self._templates)

    # ------------------------------------------------------------------------------------ answering

    def answer(self, data: bytes, peer: Peer, now: float) -> bool:
        """Answer ``data`` from ``peer`` from a template; False when the full pipeline must take it."""
        templates = self._templates
        if not templates:
            return False
        found = split(data)
        if found is None:
            return False
        shape, branch, number, from_tag = found
        key = (peer.transport, peer.host, peer.port, peer.conn, peer.local, *shape)
        template = templates.get(key)
        if template is None:
            return False
        _, aor, ctid, life, q, paths, user_agent, call_id, host, port, reply_to, *_ = template
        if not branch.startswith(b"z9hG4bK") or len(branch) > _MAX_BRANCH or len(number) > 10:
            return False
        seq = int(number)
        if seq > 2**31 - 1:
            return False
        state = self.state
        if state.draining:
            return False
        try:
            record = state.store.load(aor)
        except (Pending, StoreUnavailable):
            return False  # the pipeline parks it or answers 503
        binding = record.bindings.get(ctid) if record is not None else None
        if binding is None:
            self._drop(key)  # the binding is gone: so is what the template stood for
            return False
        try:
            if reg.repeated_cseq(call_id, seq, binding, now, state.settings):
                return False  # a retransmission: the stack's, or answered from state
        except RegistrarError:
            return False  # out of order: the pipeline answers 400
        if refresh_refusal(binding, life, peer, call_id, self._me, now) is not None:
            return False  # relayed by the pipeline
        assert record is not None
        txn_key = (branch.decode("ascii"), host, port, "REGISTER")
        answer_to = peer if reply_to is None else Peer(*reply_to)
        known = state.stack.recognised(txn_key, answer_to, now)
        if known is None:
            return False  # its transaction is still open: the stack's
        if known:
            return True  # a retransmission of an answered transaction, answered again
        limiter = self.limiter
        if limiter is not None and not limiter.allow(peer.host, now):
            return False  # over its rate: the pipeline answers 503 (the bucket stays empty for it)
        updated = record.copy()
        updated.bindings[ctid] = refreshed(binding, seq, q, life, paths, user_agent, now)
        try:
            state.commit(
                aor,
                updated,
                record,
                now,
                partial(self._reply, template, answer_to, branch, number, from_tag, updated, now),
                partial(self._again, key, data, peer),
            )
        except StoreUnavailable:
            return False  # it must be written and etcd cannot be reached: the pipeline answers 503
        return True

    def _reply(
        self,
        template: Template,
        answer_to: Peer,
        branch: bytes,
        number: bytes,
        from_tag: bytes | None,
        record: AorRecord,
        now: float,
    ) -> None:
        state = self.state
        reply, _, ctid, life, *_, contact_text, cached = template
        if cached is not None and len(record.bindings) == 1 and record.bindings[ctid].contact == contact_text:
            contact = b"%b%d%b" % (cached[0], life, cached[1])  # the only binding, just renewed
        else:
            contact = (contact_value(record, now, state.settings, None, state.cap()) or "").encode()
        stack = state.stack
        values = (branch, stack.new_tag().encode(), number, contact, from_tag or b"")  # in slot order
        state.stats.registers_answered += 1
        state.stats.template_answers += 1
        stack.answer_recognised("REGISTER", 200, fill(reply, values), answer_to, now)

    def _again(self, key: Key, data: bytes, peer: Peer, now: float) -> None:
        """The write lost its compare-and-swap (a shared store): the full pipeline decides afresh."""
        self._drop(key)
        self.state.stack.receive(data, peer, now)

    def _drop(self, key: Key) -> None:
        template = self._templates.pop(key, None)
        if template is not None and self._of_binding.get(template[2]) == key:
            del self._of_binding[template[2]]

    def forget(self, ctid: int) -> None:
        """Binding ``ctid`` is not this process's any more (removed, or another process holds its flow): its
        template goes too. :meth:`answer` drops one only when its flow sends again, which a phone that has
        left never does (the store calls this: ``Store.released``)."""
        key = self._of_binding.pop(ctid, None)
        if key is not None:
            template = self._templates.get(key)
            if template is not None and template[2] == ctid:
                del self._templates[key]

    # ------------------------------------------------------------------------------------ learning

    def learn(
        self, event: IncomingRequest, pending: reg.PendingRegister, record: AorRecord, ok: Response
    ) -> None:
        """Keep a template of a refresh the full pipeline just absorbed into ``record`` and answered with
        ``ok``, when every later request of the same shape from the same flow is sure to be decided the
        same way."""
        if not self.enabled:
            return
        found = split(event.data)
        template = self._template(event, pending, record, ok, found) if found is not None else None
        if found is None or template is None:
            return
        key = (*_peer_fields(event.peer), *found[0])
        ctid = template[2]
        old = self._of_binding.get(ctid)
        if old is not None and old != key:
            self._drop(old)  # the phone's REGISTER changed: its old shape will not come back
        templates = self._templates
        if key not in templates and len(templates) >= self.limit:
            self._drop(next(iter(templates)))
        templates[key] = template
        self._of_binding[ctid] = key

    def _template(
        self,
        event: IncomingRequest,
        pending: reg.PendingRegister,
        record: AorRecord,
        ok: Response,
        found: tuple[Shape, bytes, bytes, bytes | None],
    ) -> Template | None:
        """The template of the absorbed refresh ``event``, :func:`split` into ``found``; None when a later
        request of the same shape might not be decided or answered the same way."""
        data = event.data
        request = event.request
        view = pending.view
        if len(pending.planned) != 1 or len(view.contacts) != 1 or view.star:
            return None
        planned = pending.planned[0]
        if not planned.known or planned.life.local <= 0:
            return None
        if data.find(b"\r\n\r\n") != len(data) - 4:
            return None  # a body, or bytes after the head
        vias = request.vias
        if len(vias) != 1 or request.headers.count("via") != 1:
            return None
        via = vias[0]
        branch = via.branch or ""
        if not branch.startswith(MAGIC_COOKIE) or "tag=" in (request.headers.get("to") or "").lower():
            return None
        # split() must have found the parser's branch and CSeq, and nothing else may look like them.
        branches = list(_BRANCH.finditer(data))
        cseqs = list(_CSEQ.finditer(data))
        if len(branches) != 1 or len(cseqs) != 1:
            return None
        shape, value, number, from_tag = found
        b, c = branches[0], cseqs[0]
        if b.start(1) != len(shape[0]) or c.start(1) != len(data) - len(shape[-1]) - len(number):
            return None
        if value != branch.encode() or int(number) != request.cseq.seq:
            return None
        if from_tag is not None:
            # the parser's From tag, the only ";tag=" of that line (not one inside its URI)
            line = data[len(shape[0]) + len(value) : len(data) - len(shape[-1])]
            if from_tag.decode() != request.from_.tag or line.count(b";tag=") != 1:
                return None
        txn = event.txn
        reply_to = txn.reply_to or event.peer
        reply_cut = _reply_cut(ok.to_bytes(stream=reply_to.reliable), branch, txn.to_tag, number, from_tag)
        binding = record.bindings.get(planned.ctid)
        if reply_cut is None or binding is None:
            return None
        contact_cut = None
        if len(record.bindings) == 1:
            contact_cut = _expires_cut(ok, planned.life.local)
        return (
            reply_cut,
            view.aor,
            planned.ctid,
            planned.life.local,
            planned.contact.q,
            tuple(view.paths),
            request.headers.get("user-agent"),
            request.call_id,
            via.host.lower(),
            str(via.port or ""),
            None if reply_to == event.peer else _peer_fields(reply_to),
            binding.contact,
            contact_cut,
        )


def _expires_cut(ok: Response, life: int) -> tuple[bytes, bytes] | None:
    """The reply's Contact value cut around the one binding's ``;expires=LIFE`` (after the ``<URI>``, whose
    text may hold anything)."""
    value = (ok.headers.get("contact") or "").encode()
    close = value.find(b">")
    needle = b";expires=%d" % life
    at = value.find(needle, close)
    if close < 0 or at < 0:
        return None
    end = at + len(needle)
    if value[end : end + 1].isdigit():
        return None
    return value[: at + 9], value[end:]


def _reply_cut(
    data: bytes, branch: str, tag: str | None, number: bytes, from_tag: bytes | None
) -> Cut | None:
    """The 200 OK cut at the top Via's branch, the To tag, the CSeq number and the Contact value; None when
    any of them is not found exactly once where it belongs."""
    if tag is None:
        return None
    found: list[tuple[int, int, int]] = []
    seen: set[str] = set()
    pos = data.index(b"\r\n") + 2
    end_of_head = data.find(b"\r\n\r\n")
    while pos < end_of_head:
        eol = data.find(b"\r\n", pos)
        line = data[pos:eol]
        name, colon, _ = line.partition(b":")
        if not colon:
            return None
        key = header_key(name.strip().decode("ascii", "replace"))
        value_at = pos + len(name) + 1
        while data[value_at : value_at + 1] in (b" ", b"\t"):
            value_at += 1
        span = _slot_span(key, data, value_at, eol, branch, tag, number, from_tag)
        if span is not None:
            if key in seen:
                return None
            seen.add(key)
            found.append(span)
        pos = eol + 2
    if seen != {"via", "to", "cseq", "contact"} | ({"from"} if from_tag is not None else set()):
        return None
    return cut(data, found)


def _slot_span(
    key: str,
    data: bytes,
    start: int,
    eol: int,
    branch: str,
    tag: str,
    number: bytes,
    from_tag: bytes | None,
) -> tuple[int, int, int] | None:
    if key == "via":
        needle = b"branch=" + branch.encode()
        at = data.find(needle, start, eol)
        return None if at < 0 else (at + 7, at + len(needle), BRANCH)
    if key == "from" and from_tag is not None:
        needle = b";tag=" + from_tag
        at = data.find(needle, start, eol)
        if at < 0 or data.count(b";tag=", start, eol) != 1:
            return None
        return (at + 5, at + len(needle), FROM_TAG)
    if key == "to":
        needle = b";tag=" + tag.encode()
        at = data.find(needle, start, eol)
        return None if at < 0 else (at + 5, at + len(needle), TAG)
    if key == "cseq":
        return (start, start + len(number), CSEQ) if data.startswith(number, start) else None
    if key == "contact":
        return (start, eol, CONTACT)
    return None
