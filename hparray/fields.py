"""The value types of the config files, each with its own one-line problem: what pydantic
reports for a wrong value becomes `key problem: fix` (config.py's formatter), and Slurm's
time syntax, written once."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError

# Slurm's time syntax, written once: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit.
TIME_PATTERN = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d{2}))?(?::(\d{2}))?|UNLIMITED|INFINITE")


def slurm_seconds(value: str) -> float:
    """A Slurm time limit in seconds (inf for UNLIMITED); ValueError when it is not one."""
    match = TIME_PATTERN.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a Slurm time")
    if match.group(2) is None:
        return float("inf")
    days, first, second, third = match.groups()
    a, b, c = int(first), int(second or 0), int(third or 0)
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + a * 3600 + b * 60 + c
    if third is not None:  # HH:MM:SS
        return a * 3600 + b * 60 + c
    return a * 60 + b  # MM[:SS]


def problem_error(problem: str, fix: str = "", key: str = "") -> PydanticCustomError:
    """An error the formatter prints as `key problem: fix`; `key` names it when a whole-section
    check raises it (pydantic then locates it at the section, not at the key it is about)."""
    return PydanticCustomError("hparray", "{problem}", {"problem": problem, "fix": fix, "key": key})


def show_value(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list, tuple)) else type(value).__name__


def as_integer(value: Any) -> Any:
    """Integers, and floats with an integral value (YAML `20.0`); never booleans or strings."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise problem_error(f"must be an integer, got {show_value(value)}", "write an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise problem_error(f"must be an integer, got {show_value(value)}", "write an integer")
        return int(value)
    return value


def as_number(value: Any) -> Any:
    """Numbers, and strings that hold one ('1e-5' quoted, or read as text by another YAML tool)."""
    if isinstance(value, bool):
        raise problem_error(f"must be a number, got {show_value(value)}", "write a number")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise problem_error(f"must be a number, got {show_value(value)}", "write a number") from None
    if not isinstance(value, (int, float)):
        raise problem_error(f"must be a number, got {show_value(value)}", "write a number")
    return float(value)


def as_text(value: Any) -> Any:
    if not isinstance(value, str):
        raise problem_error(f"must be a string, got {show_value(value)}", "write a string")
    return value


def as_boolean(value: Any) -> Any:
    if not isinstance(value, bool):
        raise problem_error(f"must be true or false, got {show_value(value)}", "write true or false")
    return value


def as_strings(value: Any) -> Any:
    if not isinstance(value, (list, tuple)):
        raise problem_error(f"must be a list, got {show_value(value)}", "write a list")
    if not all(isinstance(item, str) for item in value):
        raise problem_error("must be a list of strings", "quote every element")
    return tuple(value)


Int = Annotated[int, BeforeValidator(as_integer)]
Float = Annotated[float, BeforeValidator(as_number)]
Text = Annotated[str, BeforeValidator(as_text)]
Strings = Annotated[tuple[str, ...], BeforeValidator(as_strings)]
Bool = Annotated[bool, BeforeValidator(as_boolean)]


def fix_note(text: str, **extra: Any) -> Any:
    """Field metadata: the fix printed with any problem of this key (and, for Slurm, its directive)."""
    return {"fix": text, **extra}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

