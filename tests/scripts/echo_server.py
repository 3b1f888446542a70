import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
print("echo ready", flush=True)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d:
            c.shutdown(socket.SHUT_WR); c.close(); return
        c.sendall(d)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
