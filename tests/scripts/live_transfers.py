import socket, sys, threading, time
port, n = int(sys.argv[1]), int(sys.argv[2])
conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
for c in conns:
    c.sendall(b"x" * 1024)
for c in conns:
    got = 0
    while got < 1024:
        d = c.recv(65536)
        if not d: sys.exit(2)
        got += len(d)
print("live", flush=True)
ended = []
lock = threading.Lock()
def pump(c):
    try:
        while True:
            c.sendall(b"y" * 1024)
            got = 0
            while got < 1024:
                d = c.recv(65536)
                if not d: raise EOFError()
                got += len(d)
            time.sleep(0.1)
    except Exception:
        with lock: ended.append(time.time())
for c in conns: threading.Thread(target=pump, args=(c,), daemon=True).start()
deadline = time.time() + 30
while time.time() < deadline:
    with lock:
        if len(ended) == n: break
    time.sleep(0.05)
with lock:
    print("ended", len(ended), max(ended) if ended else 0, flush=True)
    sys.exit(0 if len(ended) == n else 1)
