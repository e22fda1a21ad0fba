"""A line server for byte-level tests: answers each line with a fixed reply and appends every byte it
receives, on every connection, to a capture file (so a test can compare what went out on the wire)."""

import argparse
import selectors
import socket

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--capture", required=True)
parser.add_argument("--reply", default="+PONG\r\n")
parser.add_argument("--per", default="\n", help="one reply per occurrence of this (a line end, or a RESP '*')")
args = parser.parse_args()
reply = args.reply.encode().decode("unicode_escape").encode("latin-1")
per = args.per.encode().decode("unicode_escape").encode("latin-1")

listener = socket.create_server(("127.0.0.1", args.port))
listener.setblocking(False)
selector = selectors.DefaultSelector()
selector.register(listener, selectors.EVENT_READ)
with open(args.capture, "ab", buffering=0) as capture:
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                selector.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                selector.unregister(conn)
                conn.close()
                continue
            capture.write(data)
            conn.sendall(reply * data.count(per))
