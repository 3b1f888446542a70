# A tiny authoritative DNS server for namespace tests: answers A queries over UDP for the names
# given as NAME=ADDRESS arguments (absolute, lowercase) and NXDOMAIN for anything else; prints
# "dns ready", then one "query NAME" line per question it gets.
import socket, struct, sys
listen, records = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((listen, 53))
print("dns ready", flush=True)
while True:
    q, peer = s.recvfrom(512)
    if len(q) < 12:
        continue
    ident, flags = struct.unpack("!HH", q[:4])
    labels, i = [], 12
    while i < len(q) and q[i] != 0:
        labels.append(q[i + 1:i + 1 + q[i]].decode("ascii", "replace")); i += 1 + q[i]
    question = q[12:i + 5]
    qtype = struct.unpack("!H", q[i + 1:i + 3])[0] if i + 3 <= len(q) else 0
    name = ".".join(labels).lower() + "."
    print("query", name, flush=True)
    address = records.get(name)
    answers = b""
    if address and qtype == 1:
        answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + socket.inet_aton(address)
    rcode = 0 if address else 3
    header = struct.pack("!HHHHHH", ident, 0x8400 | (flags & 0x0100) | rcode, 1,
                         1 if answers else 0, 0, 0)
    s.sendto(header + question + answers, peer)
