"""The README's quickstart runs as written (slow: it uses the real default model)."""

import os
import re
import shlex
import subprocess

import pytest
from conftest import PY, python_env

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def _quickstart_commands() -> list[str]:
    text = open(README).read()
    block = re.search(r"## Quickstart\n\n```bash\n(.*?)```", text, re.S).group(1)
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith(("source", "#"))]


def test_quickstart_is_found():
    cmds = _quickstart_commands()
    assert any(c.startswith("upcycle convert") for c in cmds) and any(
        c.startswith("python") for c in cmds
    )


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    for cmd in _quickstart_commands():
        argv = shlex.split(cmd)
        argv = [PY, "-m", "upcycle", *argv[1:]] if argv[0] == "upcycle" else [PY, *argv[1:]]
        proc = subprocess.run(
            argv, cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
    assert os.path.isfile(tmp_path / "out" / "smol-moe" / "config.json")
