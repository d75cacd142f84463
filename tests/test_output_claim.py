"""Two upcycle processes writing the same OUT: one wins, the other fails, nothing is mixed.

The conversions of a tiny model take a fraction of a second, so every process started here
runs `python -m upcycle` with its writer slowed down (`_SLOW`, a test-side patch of
`ShardedWriter.finish`): the writers really overlap, between their claim and their publish.
"""

import filecmp
import os
import signal
import subprocess
import time

import pytest
from conftest import PY, python_env, run_cli, save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `python -m upcycle ARGS`, with a pause of DELAY seconds once every tensor is written
_SLOW = (
    "import runpy, sys, time\n"
    "import upcycle.io.writer as w\n"
    "delay, finish = float(sys.argv.pop(1)), w.ShardedWriter.finish\n"
    "def slow(self):\n"
    "    time.sleep(delay)\n"
    "    finish(self)\n"
    "w.ShardedWriter.finish = slow\n"
    "runpy.run_module('upcycle', run_name='__main__', alter_sys=True)\n"
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama and its conversions with 4 and 8 experts (the expected outputs)."""
    root = tmp_path_factory.mktemp("claim")
    src = save_tiny(str(root / "src"), "llama")
    refs = {}
    for e in (4, 8):
        refs[e] = str(root / f"ref{e}")
        r = run_cli("convert", src, refs[e], "-E", e, "-q")
        assert r.code == 0, r
    return src, refs


def _start(src, out, experts, *extra, delay=1.5):
    return subprocess.Popen(
        [PY, "-c", _SLOW, str(delay), "convert", src, str(out), "-E", str(experts), "-q", *extra],
        cwd=ROOT,
        env=python_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc):
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _experts(out) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(out)).num_local_experts


def _assert_is(out, ref):
    """`out` is complete and the very model of `ref` (same weights, same config)."""
    assert _experts(out) == _experts(ref)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert filecmp.cmp(os.path.join(out, name), os.path.join(ref, name), shallow=False), name


def _wait_for_temporary(proc, parent):
    """Until `proc` has claimed OUT and is writing its temporary folder in `parent`."""
    deadline = time.time() + 60
    while not any("upcycle-tmp" in n for n in os.listdir(parent)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)


def _leftovers(parent):
    return sorted(n for n in os.listdir(parent) if "upcycle-" in n)


def _one_line_error(err, out):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], err
    return lines[0]


def test_concurrent_writers_exactly_one_wins(models, tmp_path):
    src, refs = models
    overlapped = 0
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        order = (4, 8) if attempt % 2 == 0 else (8, 4)
        procs = {e: _start(src, out, e) for e in order}
        results = {e: _finish(p) for e, p in procs.items()}
        winners = [e for e, (code, _) in results.items() if code == 0]
        assert len(winners) == 1, results
        (winner,) = winners
        (loser,) = set(results) - {winner}
        code, err = results[loser]
        assert code != 0
        line = _one_line_error(err, out)
        assert "is writing it" in line or "exists and is not empty" in line, line
        overlapped += "is writing it" in line
        assert results[winner][1] == ""
        _assert_is(out, refs[winner])
        assert _leftovers(tmp_path) == []
    assert overlapped, "the writers never overlapped: the delay is too short for this machine"


def test_live_claim_blocks_and_a_dead_writers_claim_does_not(models, tmp_path):
    src, refs = models
    out = tmp_path / "out"
    first = _start(src, out, 4, delay=60)
    try:
        _wait_for_temporary(first, tmp_path)
        # --dry-run claims nothing and is not blocked
        r = run_cli("convert", src, str(out), "-E", "8", "--dry-run")
        assert r.code == 0 and "MixtralForCausalLM" in r.out, r
        # a second writer fails at once, naming the folder and the writer that holds it
        r = run_cli("convert", src, str(out), "-E", "8", "-q")
        assert r.code != 0, r
        line = _one_line_error(r.err, out)
        assert f"another upcycle process (pid {first.pid}) is writing it" in line, line
    finally:
        first.kill()
        first.wait()
    assert not out.exists()
    assert f".{out.name}.upcycle-claim" in os.listdir(tmp_path)  # what the killed writer left
    r = run_cli("convert", src, str(out), "-E", "8", "-q")
    assert r.code == 0, r
    _assert_is(out, refs[8])
    assert _leftovers(tmp_path) == []  # its temporary folder is gone too


def test_force_still_replaces_and_forced_writers_take_turns(models, tmp_path):
    src, refs = models
    out = tmp_path / "out"
    assert run_cli("convert", src, str(out), "-E", "4", "-q").code == 0
    r = run_cli("convert", src, str(out), "-E", "8", "-q")
    assert r.code != 0 and "exists and is not empty (use --force to replace it)" in r.err, r
    _assert_is(out, refs[4])
    r = run_cli("convert", src, str(out), "-E", "8", "-q", "--force")
    assert r.code == 0, r
    _assert_is(out, refs[8])
    assert _leftovers(tmp_path) == []

    # two forced writers at once: the later one waits for the first, then replaces its output
    procs = {e: _start(src, out, e, "--force") for e in (4, 8)}
    results = {e: _finish(p) for e, p in procs.items()}
    assert all(code == 0 for code, _ in results.values()), results
    waited = [e for e, (_, err) in results.items() if "waiting for it to finish" in err]
    assert len(waited) <= 1, results
    if waited:
        _assert_is(out, refs[waited[0]])
    else:
        assert _experts(out) in (4, 8)
        assert any(
            filecmp.cmp(out / "model.safetensors", os.path.join(r, "model.safetensors"))
            for r in refs.values()
        )
    assert _leftovers(tmp_path) == []


def test_interrupted_waiter_leaves_the_claim_to_its_holder(models, tmp_path):
    """Ctrl-C while a forced writer waits: it stops, and the holder's claim stays as it was."""
    src, _ = models
    out = tmp_path / "out"
    first = _start(src, out, 4, delay=60)
    try:
        _wait_for_temporary(first, tmp_path)
        second = _start(src, out, 8, "--force", delay=0)
        line = second.stderr.readline()
        assert f"another upcycle process (pid {first.pid}) is writing it; waiting" in line, line
        second.send_signal(signal.SIGINT)
        code, err = _finish(second)
        assert code == 130 and err.strip() == "error: interrupted; nothing was written", err
        r = run_cli("convert", src, str(out), "-E", "8", "-q")
        assert f"another upcycle process (pid {first.pid}) is writing it" in r.err, r
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


def test_no_locks_on_the_file_system_means_no_claim(models, tmp_path, monkeypatch):
    """Where flock is unsupported (ENOLCK), writers go on unclaimed, as before claims."""
    import errno
    import fcntl
    from types import SimpleNamespace

    from upcycle.io import writer

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(writer, "fcntl", SimpleNamespace(**{**vars(fcntl), "flock": no_locks}))
    src, refs = models
    out = tmp_path / "out"
    assert run_cli("convert", src, str(out), "-E", "8", "-q").code == 0
    _assert_is(out, refs[8])
    assert _leftovers(tmp_path) == []
