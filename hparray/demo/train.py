"""`python -m hparray.demo.train`: train the built-in demo model (see hparray.demo.model).

By default it overwrites the weights shipped in the package; `--from-manifest` retrains with a
manifest's settings and says whether the result is bit-identical to the weights it describes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from hparray.demo.model import (
    TrainConfig,
    compare,
    config_from_manifest,
    default_command,
    train,
)
from hparray.runners.ltx import DEMO_WEIGHTS_DIR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hparray.demo.train",
        description="Train the tiny LTX-Video model that the built-in runner ships with.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEMO_WEIGHTS_DIR, help="folder to write (replaced whole)"
    )
    parser.add_argument(
        "--from-manifest",
        type=Path,
        metavar="MANIFEST",
        help="take every setting from this manifest.json and compare the result with it",
    )
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = float if isinstance(field.default, float) else int
        parser.add_argument(flag, type=kind, default=None, help=f"default {field.default}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Train, write, and (with --from-manifest) report whether the weights match bit for bit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    reference = None
    if args.from_manifest is not None:
        reference = json.loads(args.from_manifest.read_text(encoding="utf-8"))
        cfg = config_from_manifest(args.from_manifest)
        if args.out.resolve() == args.from_manifest.parent.resolve():
            print("--out must differ from the manifest's folder: that is what it is compared with")
            return 2
    else:
        cfg = TrainConfig()
    overrides = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(TrainConfig)
        if getattr(args, field.name) is not None
    }
    cfg = dataclasses.replace(cfg, **overrides)
    manifest = train(cfg, args.out, command=default_command(argv))
    if reference is None:
        return 0
    differ = compare(manifest, reference)
    if differ:
        print(f"NOT bit-identical to {args.from_manifest}: {', '.join(differ)} differ")
        return 1
    print(f"bit-identical: every file's sha256 matches {args.from_manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
