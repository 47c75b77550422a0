"""`python -I guard.py ARGV...`: runs a resident server so that it never outlives its worker,
however the worker ends (SIGKILL included).

The worker starts this guard, which starts the server in a process group of its own:
- the guard asks the kernel for SIGTERM when the worker dies (PR_SET_PDEATHSIG), and the server
  for SIGKILL when the guard dies, so a dead worker takes the guard, and the guard the server;
- on SIGTERM, SIGINT or SIGHUP the guard kills the server's whole group (its data loaders and
  helpers too) and exits;
- it exits with the server's exit status when the server ends by itself.
stdin, stdout and stderr pass straight through: the guard reads nothing. Standard library only;
the worker runs this file by its path, so none of hparray is imported and it starts in tens of
milliseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from types import FrameType

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the helper's stdin EOF still ends the server
        pass


def main(argv: list[str]) -> int:
    parent = os.getppid()
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the worker died before the request took effect
        return 1
    server = subprocess.Popen(argv, start_new_session=True, preexec_fn=lambda: die_with_parent(signal.SIGKILL))

    def stop(signum: int, _frame: FrameType | None) -> None:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    code = server.wait()
    try:  # whatever the server left behind in its group goes with it
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
