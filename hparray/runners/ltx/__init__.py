"""The built-in `ltx` runner: LTX-Video through diffusers, in process (`runner`), its models
(`model`) and the flow-matching pieces shared with the demo model's training (`flow`)."""

from hparray.runners.ltx.model import DEMO_WEIGHTS_DIR, builtin_model_id
from hparray.runners.ltx.runner import LTXRunner

__all__ = ["DEMO_WEIGHTS_DIR", "LTXRunner", "builtin_model_id"]
