"""The shipped Open-Sora v1.3 server without Open-Sora: its conditioning plan (the table of
docs/opensora.md; the integration test checks it against the VAE's own functions), its hello,
which needs nothing but the standard library, so `plan` learns the model identity cheaply, and the
example config that `hparray init --example opensora_v1_3` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hparray.cli import cli
from hparray.config import load_sweep
from hparray.runners.resident import SERVERS_DIR

sys.path.insert(0, str(SERVERS_DIR))
import opensora_v1_3 as server  # noqa: E402


@pytest.mark.parametrize("cf, prefix4, opensora", [(5, (5, 2), (1, 1)), (11, (9, 3), (1, 1)), (17, (17, 5), (17, 5)),
                                                    (22, (21, 7), (17, 5)), (28, (25, 8), (17, 5))])
def test_the_conditioning_plan_of_the_seed_search(cf: int, prefix4: tuple[int, int], opensora: tuple[int, int]) -> None:
    assert server.condition_plan(cf, "prefix4") == prefix4
    assert server.condition_plan(cf, "opensora") == opensora


def test_the_generated_length_is_whole_micro_frames() -> None:
    assert [server.generated_frames(n) for n in (2, 17, 18, 33, 40, 49)] == [17, 17, 33, 33, 49, 49]
    assert [server.latent_frames(n) for n in (1, 5, 17, 21, 33, 49)] == [1, 2, 5, 7, 10, 15]


def test_hello_needs_neither_torch_nor_open_sora(tmp_path) -> None:
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import opensora_v1_3 as s; "
             "s.main(['--opensora', sys.argv[2]]); "
             "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'opensora')), "
             "file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe, str(SERVERS_DIR), str(tmp_path / "no-checkout")],
                          env={**os.environ, "HPARRAY_HELLO_ONLY": "1"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    hello = json.loads(done.stdout.splitlines()[0])
    assert hello["hparray"] == "hello" and hello["protocol"] == 1
    assert hello["model"].startswith("opensora-v1.3-server-1;opensora=unknown;")
    assert "HEAVY []" in done.stderr, done.stderr


def test_the_example_config_loads_after_init(tmp_path: Path) -> None:
    done = CliRunner().invoke(cli, ["init", str(tmp_path), "--example", "opensora_v1_3"])
    assert done.exit_code == 0, done.output
    sweep = load_sweep(tmp_path / "configs")
    runner = sweep.settings.runner
    assert runner.name == "resident" and runner.command[1] == "{servers}/opensora_v1_3.py"
    assert (SERVERS_DIR / "opensora_v1_3.py").is_file()
    assert sweep.settings.baseline.condition_frames == 22 and sweep.settings.data.num_frames == 49
    assert sweep.searches["condition_frames"].values == (5, 11, 17, 22, 28)
