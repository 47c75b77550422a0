"""A `notify:` command for tests: each run writes one file into the folder given as its first
argument, holding the argv it got (after the folder), its stdin parsed as JSON and the event from
the environment, so a test counts messages and compares what arrived byte for byte."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

folder = Path(sys.argv[1])
message = {"argv": sys.argv[2:], "stdin": json.loads(sys.stdin.read()),
           "event": os.environ.get("HPARRAY_NOTIFY_EVENT"), "pid": os.getpid()}
name = f"msg-{time.time_ns()}-{os.getpid()}"
(folder / f".{name}.tmp").write_text(json.dumps(message))
os.replace(folder / f".{name}.tmp", folder / f"{name}.json")  # a reader never sees half a message
