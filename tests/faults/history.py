"""The history checker of the fault runs: what the phones sent and were answered, what the main registrar
(Kamailio) received, and the calls placed from main at the end, read back after the run and checked against
the properties a registrar must keep whatever failed (issue "Faults and attacks", item 4):

1. a phone holding an unexpired 200 is reachable by a call from main once the fault is over;
2. no De-REGISTER reaches main for a binding that is still live (mode aor may move its aggregated contact:
   a De-REGISTER replaced by another contact of the same AoR is a move, not a loss);
3. exactly one De-REGISTER for each binding that expired (retransmissions of it are counted apart);
4. no 200 lists another user's binding;
5. main holds one contact per phone (mode contact) or one aggregated contact per AoR (mode aor).

Pure functions over parsed records: the rig (tests/faults/rig.py) collects them, the tests and
``python -m tests.faults.run`` print the `Report`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

PHONE_RE = re.compile(r"^REG (\S+) user=(\S+) cseq=(\d+)(?: at=(\d+))?(?: contact=(.*))?")
KAM_RE = re.compile(r" cid=(\S*) cseq=(\d+) ct=(.*) exp=(\S*) auth=\S* tu=(\S*) at=(\d+\.\d+)")
URI_USER_RE = re.compile(r"sips?:([^@;>\s]+)@")


@dataclass(frozen=True)
class Attempt:
    """One REGISTER a phone sent: when (unix s), and its outcome: "ok", a status code, or "lost"."""

    user: str
    sent: float
    outcome: str
    answered: float | None  # when the 200 came (None unless ok)
    contacts: tuple[str, ...] = ()  # the Contact of the 200 (every binding it lists)


@dataclass(frozen=True)
class MainRegister:
    """One REGISTER received by main (Kamailio's log line)."""

    user: str
    at: float
    call_id: str
    cseq: int
    contact: str
    dereg: bool


@dataclass(frozen=True)
class Phone:
    """A phone of the run: its user, the lifetime it asks for, and whether the test stopped it (a leaver)."""

    user: str
    expires: int
    leaver: bool = False


@dataclass
class Report:
    """The findings of one fault run. ``violations`` lists every broken property, one line each."""

    fault: str
    mode: str
    registers: int = 0
    failed_registers: int = 0
    longest_outage: float = 0.0  # s: the longest a phone went from a failed REGISTER to its next 200
    outage_user: str = ""
    bindings_lost: int = 0
    duplicates: int = 0
    deregisters: int = 0
    deregister_retransmissions: int = 0
    calls: int = 0
    clock_skew: dict[str, float] = field(default_factory=dict)  # process → midregistrar_clock_skew_seconds
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    diag: str = ""  # the processes' last log lines, kept when a property broke

    @property
    def ok(self) -> bool:
        return not self.violations

    def row(self) -> dict[str, object]:
        return {
            "fault": self.fault,
            "mode": self.mode,
            "registers": self.registers,
            "failed": self.failed_registers,
            "longest_outage_s": round(self.longest_outage, 2),
            "lost": self.bindings_lost,
            "duplicates": self.duplicates,
            "deregisters": self.deregisters,
            "calls": self.calls,
            "skew_seen_s": max(self.clock_skew.values(), default=0.0),
            "violations": len(self.violations),
        }

    def describe(self) -> str:
        head = ", ".join(f"{k}={v}" for k, v in self.row().items())
        lines = [
            head,
            *(f"  VIOLATION {v}" for v in self.violations[:40]),
            *(f"  note {n}" for n in self.notes),
        ]
        if len(self.violations) > 40:
            lines.append(f"  … {len(self.violations) - 40} more")
        if self.diag:
            lines.append(self.diag)
        return "\n".join(lines)


def split_contacts(value: str) -> tuple[str, ...]:
    """The URIs of a Contact header value (several bindings, comma-separated, each maybe in <>)."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in value:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    uris = []
    for part in out:
        m = re.search(r"<([^>]*)>", part)
        uri = (m.group(1) if m else part.split(";", 1)[0]).strip()
        if uri:
            uris.append(uri)
    return tuple(uris)


def parse_phone_lines(lines: Iterable[str], cseq_base: int) -> list[Attempt]:
    """The fleet scenario's log lines (tests/support/scenarios/cluster_phones.xml): CSeq and ``at`` are
    milliseconds since ``cseq_base`` (unix seconds)."""
    out = []
    for line in lines:
        m = PHONE_RE.match(line.strip())
        if m is None:
            continue
        outcome, user, cseq, at, contact = m.groups()
        sent = cseq_base + int(cseq) / 1000
        answered = cseq_base + int(at) / 1000 if at else None
        out.append(Attempt(user, sent, outcome, answered, split_contacts(contact or "")))
    return out


def parse_main_lines(lines: Iterable[str]) -> list[MainRegister]:
    """Kamailio's "REGISTER n=…" lines (tests/support/main_registrar.cfg logs the To user and the time)."""
    out = []
    for line in lines:
        m = KAM_RE.search(line)
        if m is None:
            continue
        cid, cseq, ct, exp, user, at = m.groups()
        dereg = bool(re.search(r";\s*expires=0(?!\d)", ct)) or exp == "0"
        out.append(MainRegister(user, float(at), cid, int(cseq), ct.strip(), dereg))
    return out


def _last_ok_before(attempts: Sequence[Attempt], t: float) -> Attempt | None:
    best = None
    for a in attempts:
        if a.outcome == "ok" and a.answered is not None and a.answered <= t:
            best = a
    return best


def check(
    fault: str,
    mode: str,
    phones: Sequence[Phone],
    attempts: Sequence[Attempt],
    main: Sequence[MainRegister],
    *,
    end: float,
    calls: Mapping[str, str],
    held_at_main: Mapping[str, int],
    slack: float = 1.0,
) -> Report:
    """Check the properties over one run.

    ``end``: when the run's history was read (unix s); ``calls``: user → final code of the call placed from
    main after the fault (only phones whose last 200 was unexpired are called); ``held_at_main``: user → the
    contacts main holds at the end; ``slack``: seconds of timing tolerance (timers, log latency)."""
    report = Report(fault, mode)
    by_user: dict[str, list[Attempt]] = defaultdict(list)
    for a in sorted(attempts, key=lambda a: a.sent):
        by_user[a.user].append(a)
    phone_of = {p.user: p for p in phones}

    # Answers: counts, outages, and property 4 (no other user's binding in a 200).
    for user, tries in by_user.items():
        report.registers += len(tries)
        outage_from: float | None = None
        for a in tries:
            if a.outcome != "ok":
                report.failed_registers += 1
                if outage_from is None:
                    outage_from = a.sent
                continue
            if outage_from is not None and a.answered is not None:
                if a.answered - outage_from > report.longest_outage:
                    report.longest_outage, report.outage_user = a.answered - outage_from, user
                outage_from = None
            for uri in a.contacts:
                m = URI_USER_RE.match(uri)
                if m is None or m.group(1) != user:
                    report.violations.append(f"{user}: a 200 lists another binding: {uri}")
        if outage_from is not None and end - outage_from > report.longest_outage:
            report.longest_outage, report.outage_user = end - outage_from, user

    # De-REGISTERs at main: properties 2 and 3.
    regs_by_user: dict[str, list[MainRegister]] = defaultdict(list)
    for r in main:
        regs_by_user[r.user].append(r)
    for user, phone in phone_of.items():
        regs = regs_by_user.get(user, [])
        deregs = [r for r in regs if r.dereg]
        distinct = {(r.call_id, r.cseq) for r in deregs}
        report.deregisters += len(distinct)
        report.deregister_retransmissions += len(deregs) - len(distinct)
        tries = by_user.get(user, [])
        for r in deregs:
            last = _last_ok_before(tries, r.at)
            if last is None or last.answered is None or last.answered + phone.expires <= r.at + slack:
                continue  # expired (or never registered): a De-REGISTER is due
            if mode == "aor" and any(
                not x.dereg and x.contact != r.contact and abs(x.at - r.at) < 10 for x in regs
            ):
                continue  # the aggregated contact moved to another process
            report.violations.append(
                f"{user}: De-REGISTER at {r.at:.3f} of {r.contact} while its 200 of {last.answered:.3f} "
                f"runs to {last.answered + phone.expires:.3f}"
            )
        last = _last_ok_before(tries, end)
        expired = (
            last is not None and last.answered is not None and last.answered + phone.expires + slack < end
        )
        moves = sum(
            1 for r in deregs if any(not x.dereg and x.contact != r.contact and x.at > r.at for x in regs)
        )
        due = len(distinct) - (moves if mode == "aor" else 0)
        if expired and due != 1:
            report.violations.append(f"{user}: its binding expired; {due} De-REGISTER(s) reached main, not 1")
        if expired and not phone.leaver:
            report.notes.append(f"{user} kept refreshing but its binding expired (no 200 for too long)")

    # Reachability (1) and what main holds (5).
    for user, phone in phone_of.items():
        last = _last_ok_before(by_user.get(user, []), end)
        live = last is not None and last.answered is not None and last.answered + phone.expires > end + slack
        held = held_at_main.get(user, 0)
        if live:
            report.calls += 1
            code = calls.get(user)
            if code != "200":
                report.bindings_lost += 1
                report.violations.append(f"{user}: holds an unexpired 200 but a call from main got {code!r}")
            if held > 1:
                report.duplicates += 1
                report.violations.append(f"{user}: main holds {held} contacts for one phone")
        elif held and phone.leaver:
            report.violations.append(f"{user}: expired, yet main still holds {held} contact(s)")
    return report
