"""Makes a Python process look like it runs on another node, for the clock-skew tests.

On PYTHONPATH, Python imports this module at start-up. HPARRAY_TEST_CLOCK_SHIFT_S moves
time.time (the node's wall clock, which every stamp and every reaper's judgment used to rest on)
and HPARRAY_TEST_HOST renames the host (a node of its own, so its reaper is an observer of its own).
"""

import os
import socket
import time

_shift = float(os.environ.get("HPARRAY_TEST_CLOCK_SHIFT_S", "0") or 0)
if _shift:
    _real_time = time.time
    time.time = lambda: _real_time() + _shift  # type: ignore[assignment]

_host = os.environ.get("HPARRAY_TEST_HOST")
if _host:
    socket.gethostname = lambda: _host  # type: ignore[assignment]
