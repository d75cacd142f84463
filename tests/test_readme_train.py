"""`upcycle train --method readme`: router and backbone rounds on a tiny Read-ME model.

Text over the tiny tokenizer's vocabulary (the built-in corpus would be almost all <unk> for it,
leaving the router nothing to learn from token ids); two rounds of a few steps each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_cli, save_tiny, spy_on_final_model
from safetensors.torch import load_file
from test_bad_input import assert_one_line_error
from test_bam import _LOAD_WITHOUT_UPCYCLE

import upcycle.modeling  # noqa: F401  (registers upcycle_readme)

STEPS = 4  # router and backbone steps per round; --save-steps 2 adds mid-phase checkpoints
ARGS = [
    "--method", "readme", "--rounds", "2", "--router-steps", str(STEPS), "--backbone-steps",
    str(STEPS), "--seq-len", "16", "--batch-size", "4", "--lr", "3e-3", "--router-lr", "3e-3",
    "--save-steps", "2", "-q",
]  # fmt: skip
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def write_words(path, n: int, seed: int) -> str:
    """Text records over 40 words the tiny tokenizer knows, mostly following a fixed successor
    rule (so an LM has something to learn that carries over to held-out records)."""
    words = ["the", "cat", "sat", "on", "mat", "code", "python", "def", "return", "import"]
    words += [f"w{i}" for i in range(10, 40)]
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            i, picks = int(torch.randint(0, len(words), (1,), generator=g)), []
            for _ in range(30):
                picks.append(words[i])
                jump = torch.rand(1, generator=g).item() < 0.2
                i = (
                    int(torch.randint(0, len(words), (1,), generator=g))
                    if jump
                    else (7 * i + 3) % 40
                )
            f.write(json.dumps({"text": " ".join(picks)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme-train")
    dense = save_tiny(str(root / "dense"), "llama", tokenizer=True)
    moe = str(root / "moe")
    r = run_cli(
        "convert", dense, moe, "--method", "readme", "--calibration-data", "builtin:prose",
        "--calibration-data", "builtin:code", "--calibration-tokens", "512", "-q",
    )  # fmt: skip
    assert r.code == 0, r
    data = write_words(root / "train.jsonl", 40, seed=0)
    held = write_words(root / "held.jsonl", 8, seed=1)
    return {"root": root, "dense": dense, "moe": moe, "args": ["--data", data, "--eval-data", held]}


@pytest.fixture(scope="module")
def trained(setup):
    """The uninterrupted run, with the trained model's logits taken just before its final save."""
    import upcycle.train.recipes.readme as readme

    run = setup["root"] / "run"
    with pytest.MonkeyPatch.context() as mp:
        seen = spy_on_final_model(mp, IDS, readme)
        r = run_cli("train", setup["moe"], run, *setup["args"], *ARGS)
    assert r.code == 0, r.err
    return run, seen["logits"]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def changed(a: dict, b: dict) -> set[str]:
    assert set(a) == set(b)
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_each_phase_trains_only_its_own_tensors(setup, trained):
    run, _ = trained
    ckpt = run / "checkpoints"
    base = weights(setup["moe"])
    router = {k for k in base if k.startswith("model.router.")}
    assert router and len(router) < len(base)
    # step 4: after round 1's router phase; 8: after its backbone phase; 12, 16: round 2
    states = [base] + [weights(ckpt / f"step-{s}") for s in (4, 8, 12, 16)]
    for i, (before, after) in enumerate(zip(states, states[1:], strict=False)):
        moved = changed(before, after)
        if i % 2 == 0:  # a router phase: every backbone tensor bit for bit
            assert moved and moved <= router
        else:  # a backbone phase: every router tensor bit for bit
            assert moved and not moved & router
    assert changed(states[-1], weights(run)) == set()  # the root holds the final weights


def test_router_accuracy_rises_and_held_out_loss_falls(setup, trained):
    from upcycle.io.models import load_causal_lm
    from upcycle.train.recipes.readme import router_metrics

    run, _ = trained
    labels = load_file(run / "readme_labels.safetensors")
    rows = labels["train_rows"]
    assert len(rows) and labels["train_soft"].shape[-1] == 2
    torch.testing.assert_close(labels["train_soft"].sum(-1), torch.ones(rows.shape[0], 16))
    assert torch.equal(labels["train_soft"].argmax(-1), labels["train_hard"])
    ids = [json.loads(line)["text"] for line in open(setup["args"][1])]
    from upcycle.io.models import load_tokenizer
    from upcycle.train.data import build_blocks

    blocks = build_blocks([{"text": t} for t in ids], load_tokenizer(setup["moe"]), 16)

    def accuracy(folder):
        model = load_causal_lm(str(folder), dtype=torch.float32).eval()
        return router_metrics(
            model, blocks.input_ids[rows], blocks.attention_mask[rows], labels["train_hard"],
            labels["train_soft"], 8, "cpu",
        )["accuracy"]  # fmt: skip

    first, second = accuracy(setup["moe"]), accuracy(run / "checkpoints" / "step-4")
    assert second > first + 0.05  # round 1's router phase, on the training labels

    m = metrics(run)
    evals = {(e["round"], e["phase"]): e for e in m if "eval_loss" in e}
    assert set(evals) == {(0, "start"), (0, "router"), (0, "backbone"), (1, "router"),
                          (1, "backbone")}  # fmt: skip
    for r in (0, 1):  # every backbone phase lowers the held-out LM loss
        assert evals[r, "backbone"]["eval_loss"] < evals[r, "router"]["eval_loss"] - 0.01
    for e in evals.values():
        assert 0 <= e["eval_router_accuracy"] <= 1 and e["eval_router_ce"] > 0
        assert e["eval_ppl"] == pytest.approx(torch.tensor(e["eval_loss"]).exp().item())
    steps = [e for e in m if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, 17))
    assert {e["phase"] for e in steps[:STEPS]} == {"router"} and "router_accuracy" in steps[0]
    assert [e["lr"] for e in steps[::STEPS]] == pytest.approx([3e-3, 3e-3, 2.4e-3, 2.4e-3])
    record = json.loads((run / "upcycle_train.json").read_text())
    assert record["final"]["eval_loss"] < record["final"]["eval_loss_before"]
    assert record["dense"] == os.path.abspath(setup["dense"]) and len(record["history"]) == 4
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in run.rglob("*"))


def test_merge_is_standalone_with_the_trained_logits(setup, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    run, want = trained
    out = tmp_path / "merged"
    r = run_cli("merge", run, out, "-q")
    assert r.code == 0, r.err
    for name in ("modeling_upcycle_readme.py", "readme_neurons.json", "tokenizer.json"):
        assert (out / name).is_file()
    provenance = json.loads((out / "upcycle.json").read_text())
    assert provenance["method"] == "readme-finetune" and provenance["dense"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # registered class
    with torch.no_grad():
        got = model.eval()(input_ids=IDS).logits
    assert (got - want).abs().max() < 1e-5
    # where upcycle is not installed: the folder's own code, same logits
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    saved = tmp_path / "logits.safetensors"
    script = _LOAD_WITHOUT_UPCYCLE.replace("UpcycleBam", "UpcycleReadme")
    r = subprocess.run(
        [sys.executable, "-c", script, str(out), str(saved)],
        capture_output=True, text=True, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits
    assert (load_file(saved)["logits"] - alone).abs().max() < 1e-6
    r = run_cli("eval", out, "--data", setup["args"][3], "--seq-len", "16", "--json", "-q")
    assert r.code == 0, r.err
    assert json.loads(r.out)["perplexity"] > 1


def test_ctrl_c_saves_and_resume_gives_the_uninterrupted_run(setup, trained, monkeypatch):
    """Interrupted mid backbone phase (its optimizer state in the checkpoint), resumed: the
    same weights and losses as the uninterrupted run."""
    import upcycle.train.recipes.readme as readme

    whole, _ = trained

    class CtrlC:  # Ctrl-C arrives during step 6
        def __init__(self):
            self.checks = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        @property
        def requested(self):
            self.checks += 1
            return self.checks == 6

    part = setup["root"] / "part"
    with monkeypatch.context() as mp:
        mp.setattr(readme, "Sigint", CtrlC)
        r = run_cli("train", setup["moe"], part, *setup["args"], *ARGS)
    assert r.code == 130 and "interrupted at step 6" in r.err, r.err
    assert sorted(os.listdir(part / "checkpoints")) == ["step-2", "step-4", "step-6"]
    assert not (part / "upcycle_train.json").exists()  # not a finished run
    state = json.loads((part / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert (state["round"], state["phase"], state["phase_step"]) == (0, "backbone", 2)
    assert_one_line_error(run_cli("merge", part, setup["root"] / "m"), "has not finished")

    r = run_cli("train", setup["moe"], part, *setup["args"], *ARGS, "--resume")
    assert r.code == 0, r.err
    assert changed(weights(whole), weights(part)) == set()
    strip = ("tokens_per_s", "elapsed_s")
    a = [{k: v for k, v in e.items() if k not in strip} for e in metrics(whole)]
    b = [{k: v for k, v in e.items() if k not in strip} for e in metrics(part)]
    assert a == b


def test_resume_from_a_round_end_and_changed_options(setup, trained, tmp_path):
    whole, _ = trained
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    for name in ("step-10", "step-12", "step-14", "step-16"):
        shutil.rmtree(part / "checkpoints" / name)
    (part / "upcycle_train.json").unlink()
    r = run_cli("train", setup["moe"], part, *setup["args"], *ARGS, "--rounds", "3", "--resume")
    assert_one_line_error(r, "--resume: option rounds was 2 and is now 3")
    r = run_cli("train", setup["moe"], part, *setup["args"], *ARGS, "--resume")
    assert r.code == 0, r.err
    assert changed(weights(whole), weights(part)) == set()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--router-steps", "-1"], "--router-steps must not be negative"),
        (["--router-steps", "0", "--backbone-steps", "0"], "nothing to train"),
        (["--lr-decay", "0"], "--lr-decay must be in (0, 1]"),
        (["--lr-decay", "1.5"], "--lr-decay must be in (0, 1]"),
        (["--router-lr", "0"], "--router-lr must be positive"),
        (["--router-kl-weight", "2"], "--router-kl-weight must be in [0, 1]"),
        (["--adapter", "full"], "--adapter does not apply to --method readme"),
        (["--max-steps", "3"], "--max-steps does not apply to --method readme"),
        (["--schedule", "linear"], "--schedule does not apply to --method readme"),
        (["-E", "4"], "--num-experts/-E does not apply to --method readme"),
        (["--method", "other"], "unknown --method 'other'"),
    ],
)
def test_bad_schedules_are_one_line_errors(setup, tmp_path, extra, message):
    out = tmp_path / "out"
    r = run_cli("train", setup["moe"], out, *setup["args"], *ARGS, *extra)
    assert_one_line_error(r, message)
    assert not out.exists()


def test_bad_models_are_one_line_errors(setup, tmp_path):
    out = tmp_path / "out"
    args = [*setup["args"], *ARGS]
    r = run_cli("train", setup["dense"], out, *args)
    assert_one_line_error(r, f"--method readme: {setup['dense']} is not a Read-ME model")
    r = run_cli("train", setup["moe"], out, "--data", setup["args"][1], "--rounds", "2", "-q")
    assert_one_line_error(r, "--rounds applies to --method readme")
    other = save_tiny(str(tmp_path / "other"), "llama", tokenizer=True, intermediate_size=64)
    r = run_cli("train", setup["moe"], out, *args, "--dense", other)
    assert_one_line_error(r, f"dense model {other} does not fit the Read-ME model")
    r = run_cli("train", setup["moe"], out, *args, "--dense", str(tmp_path / "nowhere"))
    assert_one_line_error(r, "not found; pass --dense")
    assert not out.exists()
