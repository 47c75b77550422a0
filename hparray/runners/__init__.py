"""Built-in runners: `ltx` (LTX-Video in diffusers, in process) and `command` (a user's script).

Each is imported lazily through `hparray.runner.runner_class`, so choosing one never pays for
the other's imports (torch and diffusers take seconds).
"""
