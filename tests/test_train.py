"""Training: loss goes down on every built-in task; resume is bit-for-bit; a run killed while
writing a checkpoint leaves the previous one loadable; bad checkpoints give clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rnnc.cli import main
from rnnc.compiler import compile_spec
from rnnc.files import load_npz
from rnnc.train import load_checkpoint

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")
TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def losses(path):
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r["val_loss"] for r in rows if r["val_loss"] is not None]


@pytest.mark.parametrize("spec,task,extra", [
    ("adding_lstm", "adding", ["--dim", "H=12", "--seq-len", "10"]),
    ("lstm", "text", ["--dim", "H=16", "--seq-len", "16"]),
    ("gru", "reber", ["--dim", "H=16"]),
    ("lstm", "copy", ["--dim", "H=16", "--seq-len", "5"]),
])  # fmt: skip
def test_loss_decreases_on_each_task(tmp_path, spec, task, extra):
    log = tmp_path / "log.jsonl"
    args = ["run", os.path.join(SPECS, spec + ".rnn"), "--train", "--task", task, "--steps", "100",
            "--batch", "16", "--quiet", "--log", str(log), "--seed", "1", *extra]  # fmt: skip
    if task == "text":
        (tmp_path / "t.txt").write_text(TEXT)
        args += ["--text", str(tmp_path / "t.txt")]
    assert main(args) == 0
    vals = losses(log)
    assert vals[-1] < 0.75 * vals[0], vals


def test_npz_task_trains_on_user_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 40, 8))
    label = (x[:, :, 0].sum(0) > 0).astype(np.int64) + 2 * (x[:, :, 1].sum(0) > 0)
    lengths = rng.integers(6, 13, 40)
    np.savez(tmp_path / "d.npz", x=x, label=label, **{"x.lengths": lengths})
    log = tmp_path / "log.jsonl"
    assert main(["run", os.path.join(SPECS, "many_to_one.rnn"), "--train", "--data", str(tmp_path / "d.npz"),
                 "--steps", "120", "--quiet", "--log", str(log), "--lr", "0.01", "--dim", "H=16"]) == 0  # fmt: skip
    vals = losses(log)
    assert vals[-1] < 0.8 * vals[0]


@pytest.mark.parametrize(
    "task,extra", [("adding", ["--seq-len", "8"]), ("text", ["--seq-len", "8"])]
)
def test_resume_is_bit_for_bit(tmp_path, task, extra):
    (tmp_path / "t.txt").write_text(TEXT)
    base = ["run", os.path.join(SPECS, "adding_lstm.rnn" if task == "adding" else "lstm.rnn"), "--train",
            "--task", task, "--batch", "8", "--quiet", "--dim", "H=8", "--checkpoint-every", "10",
            "--text", str(tmp_path / "t.txt"), *extra]  # fmt: skip
    full, part = tmp_path / "full.npz", tmp_path / "part.npz"
    assert main([*base, "--steps", "40", "--checkpoint", str(full)]) == 0
    assert main([*base, "--steps", "20", "--checkpoint", str(part)]) == 0
    assert main([*base, "--steps", "40", "--checkpoint", str(part), "--resume"]) == 0
    a, b = load_npz(str(full)), load_npz(str(part))
    keys = [k for k in a if k.startswith(("param/", "opt."))]
    assert keys and all(np.array_equal(a[k], b[k]) for k in keys)


def test_sigkill_while_checkpointing_leaves_a_loadable_checkpoint(tmp_path):
    ck = tmp_path / "ck.npz"
    cmd = [sys.executable, "-m", "rnnc.cli_entry", "run", os.path.join(SPECS, "adding_lstm.rnn"), "--train",
           "--task", "adding", "--steps", "100000", "--checkpoint", str(ck), "--checkpoint-every", "1",
           "--quiet", "--dim", "H=64", "--seq-len", "20"]  # fmt: skip
    m = compile_spec(os.path.join(SPECS, "adding_lstm.rnn"), dims={"H": 64})
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(6):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not ck.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2 + float(rng.random()) * 0.5)
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        s = load_checkpoint(str(ck), m, np.float32, {"model": "adding_lstm", "task": "adding"})
        assert s.step >= 1 and all(np.isfinite(v).all() for v in s.params.values())
    assert kills == 6


def test_bad_checkpoints_give_clear_errors(tmp_path, capsys):
    spec = os.path.join(SPECS, "adding_lstm.rnn")
    base = ["run", spec, "--train", "--task", "adding", "--quiet", "--resume", "--steps", "5"]
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert main([*base, "--checkpoint", str(tmp_path / "bad.npz")]) == 1
    assert "not a readable .npz" in capsys.readouterr().err
    ck = tmp_path / "ck.npz"
    assert main(["run", spec, "--train", "--task", "adding", "--quiet", "--steps", "2", "--dim", "H=8",
                 "--checkpoint", str(ck)]) == 0  # fmt: skip
    assert main([*base, "--dim", "H=16", "--checkpoint", str(ck)]) == 1
    err = capsys.readouterr().err
    assert "is [1, 8], the spec says [1, 16]" in err and "Traceback" not in err
    assert main(["run", os.path.join(SPECS, "adding_rnn.rnn"), "--train", "--task", "adding", "--quiet",
                 "--resume", "--steps", "5", "--checkpoint", str(ck)]) == 1  # fmt: skip
    assert "was saved for model 'adding_lstm'" in capsys.readouterr().err


def test_generate_samples_through_the_spec_rule(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    ck = tmp_path / "ck.npz"
    spec = os.path.join(SPECS, "generator.rnn")
    assert main(["run", spec, "--train", "--task", "text", "--text", str(tmp_path / "t.txt"), "--steps", "150",
                 "--dim", "H=32", "--seq-len", "16", "--quiet", "--checkpoint", str(ck), "--lr", "0.01"]) == 0  # fmt: skip
    capsys.readouterr()
    args = ["run", spec, "--generate", "60", "--checkpoint", str(ck), "--dim", "H=32", "--prime", "the ",
            "--temperature", "0.5", "--seed", "3"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("the ") and len(text) == 64
    assert main(args) == 0 and capsys.readouterr().out.strip() == text  # --seed makes it repeatable
    assert set(text) <= set(TEXT) | {"?"}
    assert sum(w in text for w in ("the", "fox", "dog", "over", "lazy", "quick")) >= 2
    base = ["run", spec, "--generate", "30", "--checkpoint", str(ck), "--dim", "H=32", "--prime", "the "]
    assert main([*base, "--decode", "greedy"]) == 0
    greedy = capsys.readouterr().out.strip()
    assert main([*base, "--top-k", "1", "--seed", "9"]) == 0  # sampling among one: greedy
    assert capsys.readouterr().out.strip() == greedy
    assert main([*base, "--decode", "beam", "--beam-width", "3", "--end", "."]) == 0
    beam = capsys.readouterr().out.strip()
    assert beam.startswith("the ") and (beam.endswith(".") or len(beam) == 34) and "." not in beam[4:-1]
    assert main([*base, "--end", "ab"]) == 2
    assert "--end takes one character" in capsys.readouterr().err


def test_forward_carry_continues_a_sequence():
    m = compile_spec(os.path.join(SPECS, "gru.rnn"), dims={"H": 8, "V": 5})
    p = m.init_params(0, np.float64)
    x = np.random.default_rng(0).normal(size=(9, 2, 5))
    whole = m.forward(p, {"x": x})["h"]
    first, carry = m.forward(p, {"x": x[:4]}, return_carry=True)
    rest = m.forward(p, {"x": x[4:]}, carry=carry)["h"]
    assert np.allclose(np.concatenate([first["h"], rest]), whole, rtol=0, atol=1e-12)
