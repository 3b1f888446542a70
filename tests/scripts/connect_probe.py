import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
except OSError as e:
    print("unreachable:", e); sys.exit(0)
sys.exit(1)
