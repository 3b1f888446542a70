import socket, ssl, sys
host, port, name, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=cafile)
with socket.create_connection((host, port), timeout=15) as raw:
    with ctx.wrap_socket(raw, server_hostname=name) as tls:
        tls.sendall(f"GET /secrets/db-password?api-version=7.4 HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = tls.recv(65536)
            if not chunk: break
            data += chunk
head, _, body = data.partition(b"\r\n\r\n")
assert head.startswith(b"HTTP/1.1 200"), head
sys.stdout.write(body.decode())
