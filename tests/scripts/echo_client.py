import os, socket, sys
payload = os.urandom(256 * 1024)
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=15)
c.sendall(payload); c.shutdown(socket.SHUT_WR)
got = b""
while True:
    d = c.recv(65536)
    if not d: break
    got += d
sys.exit(0 if got == payload else 1)
