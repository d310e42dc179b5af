"""Open files: the process raises its own soft limit and keeps a reserve of descriptors.

Every client connection, every engine connection, the model files and the logs take a file descriptor.
Many systems start processes at a soft limit of 1,024 with a far higher hard limit: 1,024 idle client
sockets were enough to make `/healthz` and every engine connection fail. The gateway raises the soft limit
to the hard limit at start, and caps client connections below it so that the rest stays free.
"""

from __future__ import annotations

import resource

# Descriptors kept for everything that is not a client connection or its engine connection: the
# listening socket, model and key files, logs, the GPU driver, the speech NIM's pool.
FD_RESERVE = 256
# Where the hard limit is "unlimited", Linux still refuses a soft limit above fs.nr_open (2^20 by default).
UNLIMITED_TARGET = 1 << 20


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


def max_client_connections(open_files: int) -> int:
    """Client connections to accept at once: each may hold one engine connection too, and the reserve
    stays free."""
    return max(16, (open_files - FD_RESERVE) // 2)
