"""Runners: what produces a row's frames. The protocol and the registry (`protocol`), the built-in
`ltx` (LTX-Video in process) and `command` (a user's script per row) runners.

Each is imported lazily through `runner_class`, so choosing one never pays for the other's imports
(torch and diffusers take seconds).
"""

from hparray.runners.protocol import (
    BUILTIN_RUNNERS,
    Clip,
    Generation,
    Hyperparams,
    Runner,
    check_runner,
    runner_class,
)

__all__ = ["BUILTIN_RUNNERS", "Clip", "Generation", "Hyperparams", "Runner", "check_runner", "runner_class"]
