#!/usr/bin/env python3
"""netsample.py - samples a network interface's byte counter on CLOCK_MONOTONIC (the clock
kvrelay's nodes stamp their traces with), for bench/run_hosts_kv.sh's overlap columns.

    netsample.py IFACE rx|tx OUT [PERIOD_MS]

Writes "seconds bytes" to OUT each time the counter moved (and once at start), every
PERIOD_MS (default 1) until SIGTERM/SIGINT. Costs a few percent of one core."""
import signal
import sys
import time


def main():
    iface, which, out = sys.argv[1], sys.argv[2], sys.argv[3]
    period = float(sys.argv[4]) / 1000.0 if len(sys.argv) > 4 else 0.001
    path = f"/sys/class/net/{iface}/statistics/{which}_bytes"
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    last = None
    with open(out, "w", buffering=1) as f, open(path, "rb", buffering=0) as c:
        while not stop:
            c.seek(0)
            v = int(c.read())
            if v != last:
                f.write(f"{time.clock_gettime(time.CLOCK_MONOTONIC):.6f} {v}\n")
                last = v
            time.sleep(period)


if __name__ == "__main__":
    main()
