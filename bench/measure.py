"""Wall time and peak RSS of a command's process tree, for the benchmark scripts.

A child started directly from a large parent takes on the parent's RSS high-water mark at
exec, so each command is spawned and reaped (os.wait4 -> ru_maxrss) by a tiny helper
process started with -I -S: the benchmark script's own memory never counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

T0 = time.perf_counter()  # when the benchmark script started (this module's import)


def log(msg: str) -> None:
    """A progress line with the wall time and the minutes since the script started."""
    elapsed = time.perf_counter() - T0
    print(f"[{time.strftime('%H:%M:%S')} +{elapsed / 60:5.1f} min] {msg}", flush=True)


def thread_env(threads: int) -> dict:
    """The environment for a measured subprocess: `threads` BLAS/OpenMP threads, offline."""
    n = str(threads)
    return {
        **os.environ,
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


_HELPER = r"""
import json, os, subprocess, sys, time
with open(sys.argv[1], "wb") as log:
    t0 = time.perf_counter()
    p = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall,
                  "rss_mib": ru.ru_maxrss / 1024}))
"""


def measure(cmd: list, log: Path, env: dict) -> dict:
    """Run cmd (output to log); {"rc", "wall_s", "rss_mib"}. Exits with the log's tail on failure."""
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _HELPER, str(log), *map(str, cmd)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    res = json.loads(out)
    if res["rc"] != 0:
        sys.exit(f"FAILED ({res['rc']}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")
    return res
