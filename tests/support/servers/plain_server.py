"""A resident server for the tests: standard library only (it runs in a venv without numpy, torch
or hparray), built on hparray_serve. It predicts the last conditioning frame repeated.

TEST_SERVER_RECORD  a folder: `pid-<pid>` at start, one `request-<n>.json` per task (with the
                    conditioning file's shape), and the markers of the one-time modes
TEST_SERVER_MODE    ok | crash-once | hang-once | hold | bad-hello | malformed
TEST_SERVER_HOLD    with `hold`: each task waits until this file exists
"""

import json
import os
import sys
import time

import hparray_serve as hs

MODE = os.environ.get("TEST_SERVER_MODE", "ok")
RECORD = os.environ.get("TEST_SERVER_RECORD", "")


def mark(name, text=""):
    if RECORD:
        with open(os.path.join(RECORD, name), "w") as fh:
            fh.write(text)


def first_time(name):
    """True once per test (the marker outlives the server process)."""
    path = os.path.join(RECORD, name)
    if os.path.exists(path):
        return False
    mark(name)
    return True


def predict(task):
    video = task.read_condition()
    count = len([n for n in os.listdir(RECORD) if n.startswith("request-")]) if RECORD else 0
    mark(f"request-{count}.json", json.dumps({"request": task.request, "condition_shape": list(video.shape),
                                                      "pid": os.getpid()}))
    if MODE == "crash-once" and task.kind == "finetune" and first_time("crashed"):
        print("about to crash on purpose", file=sys.stderr, flush=True)
        os._exit(3)
    if MODE == "hang-once" and first_time("hung"):
        print("hanging on purpose", file=sys.stderr, flush=True)
        time.sleep(3600)
    while MODE == "hold" and not os.path.exists(os.environ["TEST_SERVER_HOLD"]):
        time.sleep(0.02)
    last = video.frame(video.shape[0] - 1)
    frames = video.frames() + [last] * (task.num_frames - task.condition_frames)
    task.write_output(hs.Video.from_frames(frames, task.height, task.width, video.dtype))
    return hs.Reply(finetune_s=0.001, notes={"server_python": sys.version.split()[0]})


def raw_loop(first_line):
    """A server that breaks the protocol on purpose (without the helper's help)."""
    out = sys.stdout
    out.write(first_line + "\n")
    out.write('{"hparray": "ready", "load_s": 0}\n')
    out.flush()
    for line in sys.stdin:
        if '"shutdown"' in line:
            return
        out.write("this is not a protocol message\n")
        out.flush()


mark(f"pid-{os.getpid()}")
if MODE == "bad-hello":
    print("my own start-up message", file=sys.stderr, flush=True)
    raw_loop('{"hparray": "hello", "protocol": 99, "model": "plain"}')
elif MODE == "malformed":
    raw_loop('{"hparray": "hello", "protocol": 1, "model": "plain-malformed"}')
else:
    hs.serve("plain-server:v1", baseline=predict, finetune_and_generate=predict)
