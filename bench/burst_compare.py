#!/usr/bin/env python3
"""Compares the frames captured at the source with those an analyzer received, packet by packet.

    python3 bench/burst_compare.py SOURCE ANALYZER [--no-delay] [--from NS] [--to NS]

Both files are pcap (µs or ns timestamps) or pcapng (any if_tsresol), Ethernet. A frame is
matched by its bytes: the n-th copy of a frame at the source goes with the n-th copy at the
analyzer (TCP retransmissions are byte-identical copies). A frame not found whole is looked for by
its bytes after the Ethernet header ("altered": delivered with another link header). Source frames
stamped outside [--from, --to] (Unix ns) are left out: the window the load ran in, drained.

Prints one JSON object: source, delivered, identical, altered, missing, extra (at the analyzer,
not at the source), reordered (delivered after a frame captured later than it), peak_pps (the busiest second at
the source), and the delay,
analyzer timestamp minus source timestamp (same machine, same clock), in µs: p50, p90, p99,
p999, max, over5ms; and the delay's p99 per second of the run (tail_by_second), to tell a steady
tail from one stall. With --no-delay (a file whose timestamps are the capture's, pcap:), no delay.
Standard library only.
"""

import hashlib
import json
import struct
import sys
from collections import defaultdict


def read_pcap(path):
    """Yields (timestamp in ns, frame bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        return
    magic = data[:4]
    if magic == b"\x0a\x0d\x0d\x0a":
        yield from read_pcapng(data)
        return
    for endian in "<>":
        (m,) = struct.unpack(endian + "I", magic)
        if m in (0xA1B2C3D4, 0xA1B23C4D):
            break
    else:
        raise SystemExit(f"{path}: not a pcap or pcapng file")
    scale = 1 if m == 0xA1B23C4D else 1000
    rec = struct.Struct(endian + "IIII")
    off = 24
    while off + 16 <= len(data):
        sec, frac, incl, _orig = rec.unpack_from(data, off)
        off += 16
        if off + incl > len(data):
            break  # a file cut short by the writer being stopped
        yield sec * 1_000_000_000 + frac * scale, data[off : off + incl]
        off += incl


def read_pcapng(data):
    off, endian, resol = 0, "<", {}
    while off + 12 <= len(data):
        btype = struct.unpack_from(endian + "I", data, off)[0]
        if btype == 0x0A0D0D0A:
            bom = data[off + 8 : off + 12]
            endian = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
            resol = {}
        (blen,) = struct.unpack_from(endian + "I", data, off + 4)
        if blen < 12 or off + blen > len(data):
            break
        body = data[off + 8 : off + blen - 4]
        if btype == 0x00000001:  # IDB: look for if_tsresol (9)
            r, o = 1000, 8  # default 10^-6 s → ×1000 ns
            while o + 4 <= len(body):
                code, olen = struct.unpack_from(endian + "HH", body, o)
                if code == 0:
                    break
                if code == 9 and olen >= 1:
                    v = body[o + 4]
                    r = 10 ** (9 - v) if not v & 0x80 and v <= 9 else 1e9 / (2 ** (v & 0x7F))
                o += 4 + (olen + 3) // 4 * 4
            resol[len(resol)] = r
        elif btype == 0x00000006:  # EPB
            ifid, hi, lo, incl, _orig = struct.unpack_from(endian + "IIIII", body, 0)
            ts = (hi << 32) | lo
            yield int(ts * resol.get(ifid, 1000)), body[20 : 20 + incl]
        off += blen


def quantile(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


def main():
    args = sys.argv[1:]
    no_delay = "--no-delay" in args
    lo = hi = None
    if "--from" in args:
        lo = int(args[args.index("--from") + 1])
    if "--to" in args:
        hi = int(args[args.index("--to") + 1])
    # Bytes cut from the front of each analyzer frame: a tunnel's outer headers.
    strip = int(args[args.index("--strip") + 1]) if "--strip" in args else 0
    paths = [a for i, a in enumerate(args) if not a.startswith("--") and args[i - 1] not in ("--from", "--to", "--strip")]
    src_path, dst_path = paths[0], paths[1]

    def key(b):
        return hashlib.blake2b(b, digest_size=12).digest()

    # Source frames in capture order: (ts, whole-frame key with occurrence, L3 key with occurrence).
    src = []
    seen_whole, seen_l3 = defaultdict(int), defaultdict(int)
    for ts, b in read_pcap(src_path):
        kw, kl = key(b), key(b[14:])
        nw, nl = seen_whole[kw], seen_l3[kl]
        seen_whole[kw] += 1
        seen_l3[kl] += 1
        if (lo is not None and ts < lo) or (hi is not None and ts > hi):
            continue
        src.append((ts, (kw, nw), (kl, nl)))
    by_whole = {w: i for i, (_, w, _) in enumerate(src)}
    by_l3 = {l3: i for i, (_, _, l3) in enumerate(src)}

    got = {}  # source index → (analyzer ts, identical)
    order = []  # source indexes in analyzer order
    extra = 0
    seen_whole, seen_l3 = defaultdict(int), defaultdict(int)
    for ts, b in read_pcap(dst_path):
        b = b[strip:]
        kw, kl = key(b), key(b[14:])
        w, l3 = (kw, seen_whole[kw]), (kl, seen_l3[kl])
        seen_whole[kw] += 1
        seen_l3[kl] += 1
        i, same = by_whole.get(w), True
        if i is None or i in got:
            i, same = by_l3.get(l3), False
        if i is None or i in got:
            extra += 1
            continue
        got[i] = (ts, same)
        order.append(i)

    reordered, highest = 0, -1
    for i in order:
        if i < highest:
            reordered += 1
        highest = max(highest, i)
    out = {
        "source": len(src),
        "delivered": len(got),
        "identical": sum(1 for _, s in got.values() if s),
        "altered": sum(1 for _, s in got.values() if not s),
        "missing": len(src) - len(got),
        "extra": extra,
        "reordered": reordered,
    }
    if src:
        span = (src[-1][0] - src[0][0]) / 1e9
        out["source_seconds"] = round(span, 2)
        per_s = defaultdict(int)
        for ts, _, _ in src:
            per_s[ts // 1_000_000_000] += 1
        out["peak_pps"] = max(per_s.values())
    if not no_delay and got:
        delays = sorted((t - src[i][0]) / 1000 for i, (t, _) in got.items())
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
            out[f"delay_{name}_us"] = round(quantile(delays, q))
        out["delay_max_us"] = round(delays[-1])
        out["delay_over5ms"] = sum(1 for d in delays if d > 5000)
        per_second = defaultdict(list)
        t0 = src[0][0]
        for i, (t, _) in got.items():
            per_second[int((src[i][0] - t0) // 1_000_000_000)].append((t - src[i][0]) / 1000)
        out["tail_by_second"] = [
            round(quantile(sorted(v), 0.99)) for _, v in sorted(per_second.items())
        ]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
