"""An interrupted or failing conversion leaves nothing that looks like a finished model."""

import os
import resource
import signal
import subprocess
import time

from conftest import PY, python_env, save_tiny


def _leftovers(parent):
    return [n for n in os.listdir(parent) if "upcycle-tmp" in n or n == "out"]


def _big_source(tmp_path):
    # ~40 MB of fp32 weights -> ~300 MB written with 8 experts: long enough to interrupt.
    return save_tiny(
        str(tmp_path / "src"),
        "llama",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=256,
    )


def test_sigint_leaves_nothing(tmp_path):
    src = _big_source(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "upcycle",
            "convert",
            src,
            str(out),
            "-E",
            "8",
            "--fsync",
            "--max-shard-size",
            "20MB",
        ],
        env=python_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any("upcycle-tmp" in n for n in os.listdir(tmp_path)):
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted; nothing was written"
    assert "Traceback" not in err
    assert _leftovers(tmp_path) == []


def test_full_disk_leaves_nothing(tmp_path):
    """A file-size limit makes writes fail as a full disk would (EFBIG instead of ENOSPC)."""
    src = _big_source(tmp_path)
    out = tmp_path / "out"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000_000, 20_000_000))

    proc = subprocess.run(
        [PY, "-m", "upcycle", "convert", src, str(out), "-E", "8", "-q"],
        env=python_env(),
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left" in lines[0], proc.stderr
    assert _leftovers(tmp_path) == []


def test_kill_leaves_no_finished_output(tmp_path):
    """Even SIGKILL (no cleanup possible) leaves only a hidden temporary folder, never OUT."""
    src = _big_source(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [PY, "-m", "upcycle", "convert", src, str(out), "-E", "8", "-q"],
        env=python_env(),
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any("upcycle-tmp" in n for n in os.listdir(tmp_path)):
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert not out.exists()
