"""A classic BPF socket filter (Linux ``SO_ATTACH_FILTER``) that drops the datagrams of blocked source
addresses in the kernel, before they are queued on the socket.

Dropping a flood in Python still costs a system call, a bytes object and a callback per datagram (~3 µs): at
hundreds of thousands a second that is a core, and the socket's queue overflows, losing honest phones'
datagrams with the flood's. A source far over ``--source-rate-limit`` is therefore blocked for a while by a
filter on every UDP socket: its datagrams then cost the process nothing. The program compares the source of
each datagram with the blocked addresses (IPv4, and IPv6 compared as four words; an IPv4 datagram on a
dual-stack socket has an IPv4 header) and accepts everything else. Attaching one needs no privilege; it
replaces the previous filter atomically.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterable

__all__ = ["MAX_V4", "MAX_V6", "attach", "detach", "program"]

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)
MAX_V4 = 64  # blocked IPv4 sources one program holds (its jumps are 8-bit offsets)
MAX_V6 = 16

_NET = 0xFFF00000  # SKF_NET_OFF: offsets from the network (IP) header, wherever the socket's data starts
_LDB = 0x30  # BPF_LD | BPF_B | BPF_ABS
_LDW = 0x20  # BPF_LD | BPF_W | BPF_ABS
_RSH = 0x74  # BPF_ALU | BPF_RSH | BPF_K
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
_ACCEPT = 0xFFFFFFFF  # keep the whole datagram
_DROP = 0


def program(hosts: Iterable[str]) -> list[tuple[int, int, int, int]]:
    """The filter dropping datagrams from ``hosts`` (IP address texts; IPv4-mapped IPv6 counts as IPv4;
    beyond :data:`MAX_V4` and :data:`MAX_V6`, and names, are left out): (code, jt, jf, k) instructions."""
    v4: list[int] = []
    v6: list[int] = []
    for host in hosts:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if isinstance(address, ipaddress.IPv4Address):
            if len(v4) < MAX_V4:
                v4.append(int(address))
        elif len(v6) < MAX_V6:
            v6.append(int(address))
    n4, n6 = len(v4), len(v6)
    code = [
        (_LDB, 0, 0, _NET),  # the version nibble
        (_RSH, 0, 0, 4),
        (_JEQ, 0, n4 + 3, 4),  # IPv4 here, else on to the IPv6 part
        (_LDW, 0, 0, _NET + 12),  # IPv4 source
    ]
    code += [(_JEQ, n4 - i, 0, value) for i, value in enumerate(v4)]
    code += [(_RET, 0, 0, _ACCEPT), (_RET, 0, 0, _DROP)]
    for j, value in enumerate(v6):
        words = [(value >> shift) & 0xFFFFFFFF for shift in (96, 64, 32, 0)]
        for w, word in enumerate(words):
            code.append((_LDW, 0, 0, _NET + 8 + 4 * w))  # IPv6 source, word by word
            last = w == 3
            code.append((_JEQ, 8 * (n6 - j) - 7 if last else 0, 0 if last else 6 - 2 * w, word))
    code += [(_RET, 0, 0, _ACCEPT), (_RET, 0, 0, _DROP)]
    return code


def attach(sock: socket.socket, hosts: Iterable[str]) -> None:
    """Drop ``hosts``' datagrams on ``sock`` from now on (replacing any filter it had); OSError if the kernel
    refuses."""
    code = program(hosts)
    buffer = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in code))
    # struct sock_fprog: the length, then a pointer to the instructions (the kernel copies them).
    fprog = struct.pack("HL", len(code), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def detach(sock: socket.socket) -> None:
    """Accept every datagram again."""
    with contextlib.suppress(OSError):  # ENOENT: no filter attached
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
