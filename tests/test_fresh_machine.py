"""A checkout on a fresh machine: nothing of ours shadows a dependency, runs stay offline.

Everything here runs Python the way a user does, in a subprocess whose working directory is
the repository root (which Python then puts first on sys.path).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import PY, save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folders whose modules Python may put first on sys.path: the root (`python -c`, `-m`) and the
# folders of scripts and tests.
PATH_FOLDERS = ("", "bench", "bench/anchors", "examples", "tests")
# Top-level folders of the layout that setup.cfg installs under another name; from the root they
# hand their import over to the installed distribution of that name (upcycle.checkout).
HANDED_OVER = {"adapters": "upcycle.adapters", "kernels": "upcycle.kernels"}


def python(*args: str, cwd: str = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` in `cwd` (the repository root), in `env` (default: the test's environment
    less PYTHONPATH), output captured."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [PY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def run(code: str, cwd: str = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -c code` in `cwd`, with the test's environment less PYTHONPATH, plus `env`."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **(env or {})}
    return python("-c", code, cwd=cwd, env=env)


def test_transformers_imports_from_the_repository_root():
    r = run("import transformers.activations")
    assert r.returncode == 0, r.stderr


def test_import_kernels_from_the_root_gives_the_installed_package(tmp_path):
    pytest.importorskip("kernels")  # transformers >= 5.25 requires it
    code = "import kernels, os; print(os.path.realpath(kernels.__file__))"
    here, elsewhere = run(code), run(code, cwd=str(tmp_path))
    assert here.returncode == 0, here.stderr
    assert here.stdout == elsewhere.stdout
    assert here.stdout.strip() != os.path.realpath(os.path.join(ROOT, "kernels", "__init__.py"))


def test_import_adapters_from_the_root_is_what_it_is_elsewhere(tmp_path):
    """No AdapterHub installed: ModuleNotFoundError, as anywhere. One installed (here a stand-in
    on PYTHONPATH, which comes after the root on sys.path): that one."""
    code = "import adapters; print(adapters.__file__)"
    here, elsewhere = run(code), run(code, cwd=str(tmp_path))
    assert here.returncode == elsewhere.returncode
    if elsewhere.returncode != 0:
        assert "ModuleNotFoundError: No module named 'adapters'" in here.stderr
    site = tmp_path / "site"
    (site / "adapters").mkdir(parents=True)
    (site / "adapters" / "__init__.py").write_text("WHO = 'adapterhub'\n")
    r = run("import adapters; print(adapters.WHO)", env={"PYTHONPATH": str(site)})
    assert (r.returncode, r.stdout.strip()) == (0, "adapterhub"), r.stderr


def test_the_layout_still_installs_under_upcycle(tmp_path):
    code = (
        "import upcycle.adapters, upcycle.kernels; print(upcycle.adapters.MixLoraConfig.__name__)"
    )
    for cwd in (ROOT, str(tmp_path)):
        r = run(code, cwd=cwd)
        assert (r.returncode, r.stdout.strip()) == (0, "MixLoraConfig"), r.stderr


def _dependency_import_names() -> set[str]:
    """Top-level import names of every installed distribution but upcycle, and the standard
    library's module names."""
    names = {
        name
        for name, dists in importlib.metadata.packages_distributions().items()
        if any(d.lower() != "upcycle" for d in dists)
    }
    return names | set(sys.stdlib_module_names) | set(HANDED_OVER)


def test_no_module_in_a_path_folder_is_named_like_a_dependency():
    taken = _dependency_import_names()
    clashes = []
    for folder in PATH_FOLDERS:
        path = os.path.join(ROOT, folder)
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name.endswith(".py"):
                module = name[:-3]
            elif os.path.isfile(os.path.join(full, "__init__.py")):
                module = name
            else:
                continue
            if module in taken and not (folder == "" and module in HANDED_OVER):
                clashes.append(os.path.join(folder, name))
    assert clashes == []
    for name in HANDED_OVER:  # the exceptions hand their import over, first thing
        init = open(os.path.join(ROOT, name, "__init__.py")).read()
        assert f'if __name__ != "{HANDED_OVER[name]}":' in init
        assert "hand_over(__name__, __file__)" in init


def test_a_bench_script_starts(tmp_path):
    r = python(
        "bench/gpu_moe.py", "--smoke", "--configs", "fine", "--tokens", "16",
        "--reps", "1", "--warmup", "0", "--modes", "fwd", "--out", str(tmp_path / "o.json"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.json").exists()


SITECUSTOMIZE = """
import os, sys

LOG = os.environ["UPCYCLE_TEST_NETWORK_LOG"]
LOCAL = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0"}


def _host(event, args):
    if event == "socket.getaddrinfo":
        return args[0]
    if event == "socket.connect" and isinstance(args[1], tuple):
        return args[1][0]
    return None


def _hook(event, args):
    if event in ("socket.getaddrinfo", "socket.connect"):
        host = _host(event, args)
        if isinstance(host, bytes):
            host = host.decode()
        if host not in LOCAL:
            with open(LOG, "a") as f:
                f.write(f"{event} {host}\\n")


sys.addaudithook(_hook)
"""


@pytest.fixture
def no_network(tmp_path):
    """Environment for a subprocess that logs every attempt to reach another host."""
    site = tmp_path / "audit"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "USE_HUB_KERNELS")}
    env.update(PYTHONPATH=str(site), UPCYCLE_TEST_NETWORK_LOG=str(log))
    return env, log


def test_an_example_trains_merges_and_answers_offline_and_quietly(tmp_path, no_network):
    """examples/finetune_mixlora.py on a tiny model: it runs, reaches for no other host, and
    prints no third-party warning about Hub kernels."""
    from test_train import write_data
    from transformers import AutoTokenizer

    env, log = no_network
    base = save_tiny(str(tmp_path / "base"), "llama", tokenizer=True)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(base)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {base}\ndata: {write_data(tmp_path)}\nseq_len: 16\nbatch_size: 2\n"
        "num_experts: 2\nr: 2\nmax_steps: 2\nmax_eval_blocks: 2\nprogress: false\n"
    )
    out = str(tmp_path / "o")
    r = python("examples/finetune_mixlora.py", "--config", str(config), "--out", out, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "merged" / "config.json").exists()
    assert not log.exists(), log.read_text()
    assert "kernels-community" not in r.stderr and "Hub" not in r.stderr, r.stderr


def test_upcycle_train_reaches_for_no_host(tmp_path, no_network):
    from test_train import write_data

    env, log = no_network
    base = save_tiny(str(tmp_path / "base"), "llama", tokenizer=True)
    r = python(
        "-m", "upcycle", "train", base, str(tmp_path / "run"), "--data", str(write_data(tmp_path)),
        "--seq-len", "16", "--max-steps", "1", "-E", "2", "-q", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not log.exists(), log.read_text()
    assert "kernels-community" not in r.stderr, r.stderr


def test_importing_upcycle_adapters_is_quiet(no_network):
    env, log = no_network
    r = python("-c", "import upcycle.adapters", env=env)
    assert (r.returncode, r.stderr) == (0, "")
    assert not log.exists(), log.read_text()


def test_models_load_without_hub_kernels_unless_asked(tmp_path, monkeypatch):
    import transformers

    from upcycle.io import hub
    from upcycle.io.models import load_causal_lm

    path = save_tiny(str(tmp_path / "m"), "llama", tokenizer=True)
    assert load_causal_lm(path).use_kernels is False
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("use_kernels"))
        return real(*args, **{**kwargs, "use_kernels": False})

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(hub, "_hub_kernels", False)
    from conftest import run_cli

    args = ("eval", path, "--data", "builtin", "--max-tokens", "64", "--seq-len", "32", "-q")
    assert run_cli(*args).code == 0
    assert run_cli(*args, "--hub-kernels").code == 0
    assert seen == [False, True]
