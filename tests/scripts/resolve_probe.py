import socket, sys
try:
    socket.getaddrinfo(sys.argv[1], 443)
except OSError as e:
    print("unresolvable:", e); sys.exit(0)
sys.exit(1)
