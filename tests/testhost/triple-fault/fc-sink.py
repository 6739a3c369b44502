#!/usr/bin/python3
"""fc-sink.py PATH EXPECTED: listens on the Unix socket PATH, takes one connection, reads it and prints
`bytes N sha256 HEX` on stdout. The host half of the Firecracker comparison in ../TRIPLE-FAULT.md:
Firecracker forwards the guest's vsock connection to CID 2 port P to the socket UDS_PATH_P.

Once EXPECTED bytes have arrived it sends vsend one byte, which vsend waits for before the guest resets,
so that nothing is still in flight then (Firecracker ends the host connection at the guest's first
shutdown, so a half-close cannot carry that). Then it reads on for at most 10 s, to count any excess."""
import hashlib
import os
import socket
import sys

path = sys.argv[1]
expected = int(sys.argv[2])
try:
    os.unlink(path)
except FileNotFoundError:
    pass
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(1)
# tells the caller that the socket exists
print("listening", flush=True)
conn, _ = server.accept()
total = 0
acked = False
digest = hashlib.sha256()
while True:
    try:
        chunk = conn.recv(1 << 20)
    except (socket.timeout, OSError):
        break
    if not chunk:
        break
    total += len(chunk)
    digest.update(chunk)
    if not acked and total >= expected:
        acked = True
        try:
            conn.sendall(b"k")
        except OSError:
            pass
        conn.settimeout(10)
conn.close()
print(f"bytes {total} sha256 {digest.hexdigest()}", flush=True)
