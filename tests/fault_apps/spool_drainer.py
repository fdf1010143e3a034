"""Drain a shared spool as a delivery worker would, without HTTP: lease, "send", complete.

``python spool_drainer.py SPOOL DEST OUT`` (SPOOL: a file or a PostgreSQL URL) leases
batches of 5 due records, appends each leased key to ``OUT`` (one per line, flushed) and
completes the batch, until the spool has nothing pending for ``DEST``. Several of these on
one spool must never lease a record twice.
"""

from __future__ import annotations

import sys
import time

from paygent_otel.delivery.spool import open_spool


def main() -> int:
    path, dest, out = sys.argv[1:4]
    spool = open_spool(path, max_bytes=1 << 30)  # a file or a postgresql:// URL
    with open(out, "a", encoding="utf-8") as sink:
        while spool.pending(dest):
            items = spool.lease(dest, 5, time.time())
            for item in items:
                sink.write(item.key + "\n")
            sink.flush()
            # A little "network" time, so the other drainers run while this one holds leases.
            time.sleep(0.001)
            spool.complete([i.rowid for i in items], [i.key for i in items], time.time())
    spool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
