"""A DogStatsD catcher on loopback UDP: TEST INFRASTRUCTURE (ddapm-test-agent takes no DogStatsD).

Appends every datagram it receives, one metric line per line, to --out.

Run: python local/dogstatsd_catcher.py --port 16525 --out .stack/dogstatsd.log
"""

import argparse
import contextlib
import socket


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=16525)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, open(args.out, "a", buffering=1) as out:
        sock.bind((args.host, args.port))
        while True:
            datagram, _ = sock.recvfrom(65535)
            out.write(datagram.decode(errors="replace").rstrip("\n") + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
