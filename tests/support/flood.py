"""One flooding host: UDP datagrams from one source address at a fixed rate (or as fast as one process goes),
for tests/integration/test_floods.py and bench/flood_bench.py.

    python -m tests.support.flood --target 127.0.0.1:5060 --source 127.0.0.2 --kind options \\
        --rate 300000 --duration 10

Kinds: ``register`` (every datagram a REGISTER of a user, Call-ID and branch of its own: a new phone each time,
which a registrar relays), ``options`` (OPTIONS to the registrar itself, which it answers), ``garbage`` (random
bytes). The datagrams are made before the clock starts (a pool of ``--pool``, sent round robin) and sent over a
connected socket, so the loop is one ``send`` per datagram; it checks the clock every 64 sends and sleeps when
ahead of the rate. Answers are read between batches and counted by status code. One JSON line on stdout:
sent, the rate reached, send errors (ENOBUFS, ECONNREFUSED), answers by code, the sender's own CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from registrar.core import digest
from tests.support import REPO
from tests.support.sip import sip_request, status_code, udp_exchange

KINDS = ("register", "options", "garbage")
BATCH = 64


def datagrams(kind: str, target: tuple[str, int], source: tuple[str, int], count: int) -> list[bytes]:
    host, port = target
    me = f"{source[0]}:{source[1]}"
    rng = random.Random(15)
    out = []
    for i in range(count):
        if kind == "garbage":
            out.append(rng.randbytes(rng.randrange(40, 600)))
            continue
        method = "REGISTER" if kind == "register" else "OPTIONS"
        user = f"flood{i}"
        ruri = f"sip:{host}:{port}" if kind == "options" else "sip:example.com"
        lines = [
            f"{method} {ruri} SIP/2.0",
            f"Via: SIP/2.0/UDP {me};rport;branch=z9hG4bK-fl{os.getpid()}x{i}",
            "Max-Forwards: 70",
            f"From: <sip:{user}@example.com>;tag=fl{i}",
            f"To: <sip:{user}@example.com>",
            f"Call-ID: fl{i}-{os.getpid()}@{source[0]}",
            f"CSeq: 1 {method}",
        ]
        if kind == "register":
            lines += [f"Contact: <sip:{user}@{me}>;expires=300", "Expires: 300"]
        lines.append("Content-Length: 0")
        out.append(("\r\n".join(lines) + "\r\n\r\n").encode())
    return out


def flood(
    target: tuple[str, int], source: str, kind: str, rate: float, duration: float, pool: int = 20_000
) -> dict[str, Any]:
    """Send for ``duration`` s at ``rate`` datagrams/s (0: as fast as possible); the report."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((source, 0))
    sock.connect(target)
    sock.setblocking(False)
    messages = datagrams(kind, target, sock.getsockname()[:2], pool)
    answers: dict[str, int] = {}
    send, recv = sock.send, sock.recv
    sent = errors = 0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    end = start + duration
    index = 0
    clock = time.perf_counter
    while True:
        now = clock()
        if now >= end:
            break
        if rate:
            due = int((now - start) * rate)
            if sent >= due:
                time.sleep(min(0.0005, (sent + 1 - due) / rate))
                continue
            count = min(BATCH, due - sent)
        else:
            count = BATCH
        for _ in range(count):
            try:
                send(messages[index])
            except OSError:
                errors += 1
            index += 1
            if index == pool:
                index = 0
        sent += count
        while True:  # the answers waiting (a flood that is answered gets them back)
            try:
                data = recv(65536)
            except OSError:
                break
            code = data[8:11].decode("ascii", "replace") if data.startswith(b"SIP/2.0 ") else "other"
            answers[code] = answers.get(code, 0) + 1
    elapsed = clock() - start
    time.sleep(0.3)  # late answers
    while True:
        try:
            data = recv(65536)
        except OSError:
            break
        code = data[8:11].decode("ascii", "replace") if data.startswith(b"SIP/2.0 ") else "other"
        answers[code] = answers.get(code, 0) + 1
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    sock.close()
    return {
        "kind": kind,
        "source": source,
        "offered_rate": rate,
        "sent": sent,
        "seconds": round(elapsed, 3),
        "rate": round(sent / elapsed) if elapsed else 0,
        "send_errors": errors,
        "answers": answers,
        "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 3),
    }


class DigestPhone:
    """A raw UDP phone of alice (realm example.test) on its own loopback address: registers through the main
    registrar, then refreshes on that flow (absorbed, so the local digest gate answers); a brute forcer is one
    answering with guesses."""

    def __init__(self, target: tuple[str, int], source: str) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.local = self.sock.getsockname()[:2]
        self.call_id = f"alice-{source}"
        self.cseq = 1
        self.contact = f"<sip:alice@{source}:{self.local[1]}>;expires=300"

    def register(self, password: str | None = None, nonce: str | None = None) -> bytes | None:
        self.cseq += 1
        headers = [("Contact", self.contact)]
        if password is not None:
            challenge = {"realm": "example.test", "nonce": nonce or "", "qop": "auth"}
            creds = digest.Credentials("example.test", "alice", password)
            answer = digest.authorization(challenge, creds, "REGISTER", "sip:example.test", f"c{self.cseq}")
            headers.append(("Authorization", answer))
        msg = sip_request(
            "REGISTER", "sip:example.test", self.local, headers=headers, call_id=self.call_id,
            cseq=self.cseq, from_uri="sip:alice@example.test", from_tag="a", to_uri="sip:alice@example.test",
        )  # fmt: skip
        return udp_exchange(self.target, msg, timeout=3, sock=self.sock)

    def nonce(self) -> str:
        reply = self.register()
        assert status_code(reply) == 401, reply
        m = re.search(rb'nonce="([^"]+)"', reply or b"")
        assert m is not None
        return m.group(1).decode()

    def authenticate(self, password: str) -> int | None:
        return status_code(self.register(password, self.nonce()))


@dataclass
class Flooder:
    """``python -m tests.support.flood`` as a process of its own (the test's and the registrar's CPU apart)."""

    target: tuple[str, int]
    source: str
    kind: str
    rate: float
    duration: float

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "tests.support.flood", "--target", f"{self.target[0]}:{self.target[1]}",
            "--source", self.source, "--kind", self.kind, "--rate", str(self.rate),
            "--duration", str(self.duration),
        ]  # fmt: skip

    def start(self) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        return subprocess.Popen(
            self.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    @staticmethod
    def result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"flooder exited {proc.returncode}: {err[-2000:]}")
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return report

    def run(self) -> dict[str, Any]:
        return self.result(self.start(), self.duration + 60)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="HOST:PORT (IPv4)")
    ap.add_argument("--source", default="127.0.0.2", help="local IPv4 address to send from")
    ap.add_argument("--kind", choices=KINDS, default="options")
    ap.add_argument("--rate", type=float, default=0.0, help="datagrams per second (0: as fast as it goes)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds")
    ap.add_argument("--pool", type=int, default=20_000, help="distinct datagrams, sent round robin")
    args = ap.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    report = flood((host, int(port)), args.source, args.kind, args.rate, args.duration, args.pool)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
