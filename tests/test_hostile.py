"""Hostile input (issue 11): every malformed data, parameter or checkpoint file, every
nonsensical command-line number and every oversized request ends in a worded error naming
what is wrong, with exit 1 (2 for command-line misuse), never "internal error" (exit 3).

One table: a case builds its files in a fresh folder and returns the command line; the test
asserts the exit code and the words of the error."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest

from rnnc.cli import main
from rnnc.compiler import compile_spec

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")


def spec(name: str) -> str:
    return os.path.join(SPECS, name + ".rnn")


ELMAN, RNN = spec("elman"), spec("adding_rnn")
TRAIN = ["run", RNN, "--train", "--task", "adding", "--quiet", "--dim", "H=4", "--seq-len", "5",
         "--batch", "4"]  # fmt: skip
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def rng():
    return np.random.default_rng(0)


def elman_data(T=6, B=3, **over):
    arrays = {"x": rng().normal(size=(T, B, 27)).astype(np.float32), "y": np.zeros((T, B), np.int64)}
    return {**arrays, **over}


def npz(d, name: str, **arrays) -> str:
    path = str(d / name)
    np.savez(path, **arrays)
    return path


def data_run(spec_path, **arrays):
    return lambda d: ["run", spec_path, "--data", npz(d, "d.npz", **arrays)]


def elman_params(**over):
    p = compile_spec(ELMAN).init_params(0)
    return {**p, **over}


def params_run(**over):
    def build(d):
        return ["run", ELMAN, "--data", npz(d, "d.npz", **elman_data()),
                "--params", npz(d, "p.npz", **elman_params(**over))]  # fmt: skip

    return build


# ----- files that are not what they claim to be -----


def npy_as_npz(d):
    np.save(d / "d.npy", np.zeros((6, 3, 27)))
    os.replace(d / "d.npy", d / "d.npz")
    return ["run", ELMAN, "--data", str(d / "d.npz")]


def header_claims_a_terabyte(d):
    """An .npy whose header says [250e9] float32 over 80 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": (250_000_000_000,)})  # fmt: skip
    with zipfile.ZipFile(d / "d.npz", "w") as z:
        z.writestr("x.npy", buf.getvalue() + bytes(80))
        z.writestr("y.npy", npy_bytes(np.zeros((6, 3), np.int64)))
    return ["run", ELMAN, "--data", str(d / "d.npz")]


def npy_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def zip_bomb(d, size=300 * 2**20):
    """`size` bytes of zeros deflated to a few hundred KB, written in chunks."""
    header = io.BytesIO()
    n = size // 4
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (n // (3 * 27), 3, 27)})  # fmt: skip
    with zipfile.ZipFile(d / "d.npz", "w", zipfile.ZIP_DEFLATED) as z, \
            z.open("x.npy", "w", force_zip64=True) as f:  # fmt: skip
        f.write(header.getvalue())
        chunk = bytes(2**22)
        left = (n // (3 * 27)) * 3 * 27 * 4
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    return ["run", ELMAN, "--data", str(d / "d.npz")]


def object_array(d):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False,
                                               "shape": (2,)})  # fmt: skip
    with zipfile.ZipFile(d / "d.npz", "w") as z:
        z.writestr("x.npy", buf.getvalue() + b"\x80\x04N." * 2)
    return ["run", ELMAN, "--data", str(d / "d.npz")]


def not_an_array(d):
    with zipfile.ZipFile(d / "d.npz", "w") as z:
        z.writestr("x.npy", npy_bytes(np.zeros((6, 3, 27), np.float32)))
        z.writestr("notes.txt", b"hello")
    return ["run", ELMAN, "--data", str(d / "d.npz")]


# ----- checkpoints -----


def checkpoint(d, text=False) -> str:
    """A real checkpoint of two training steps (a text run carries its state)."""
    ck = str(d / "ck.npz")
    if text:
        (d / "t.txt").write_text(TEXT)
        args = ["run", ELMAN, "--train", "--task", "text", "--text", str(d / "t.txt"), "--quiet",
                "--dim", "H=4", "--seq-len", "5", "--batch", "4", "--steps", "2"]  # fmt: skip
    else:
        args = [*TRAIN, "--steps", "2"]
    assert main([*args, "--checkpoint", ck]) == 0
    return ck


def edited(ck: str, change=None, **arrays) -> None:
    """The checkpoint with its metadata changed by `change` (a function of the dict) and some
    arrays replaced (None removes one)."""
    with np.load(ck) as z:
        a = {k: z[k] for k in z.files}
    if change is not None:
        info = change(json.loads(a["meta"].tobytes()))
        a["meta"] = np.frombuffer(json.dumps(info).encode(), np.uint8)
    for k, v in arrays.items():
        k = k.replace("__", "/")
        if v is None:
            a.pop(k)
        else:
            a[k] = v
    np.savez(ck, **a)


def resume(change=None, text=False, extra=(), **arrays):
    def build(d):
        ck = checkpoint(d, text)
        edited(ck, change, **arrays)
        if text:
            return ["run", ELMAN, "--train", "--task", "text", "--text", str(d / "t.txt"), "--quiet",
                    "--dim", "H=4", "--seq-len", "5", "--batch", "4", "--steps", "3", "--resume",
                    "--checkpoint", ck, *extra]  # fmt: skip
        return [*TRAIN, "--steps", "3", "--resume", "--checkpoint", ck, *extra]

    return build


def put(key, value):
    def change(info):
        info[key] = value
        return info

    return change


def without(key):
    def change(info):
        info.pop(key)
        return info

    return change


def rng_state_of_another_generator(info):
    info["rng"] = {"bit_generator": "MT19937", "state": {"key": [0] * 624, "pos": 0}}
    return info


def resume_other(*flags):
    def build(d):
        ck = checkpoint(d)
        return [*TRAIN, "--steps", "3", "--resume", "--checkpoint", ck, *flags]

    return build


def generate_with_prime(prime, *flags):
    def build(d):
        ck = checkpoint(d, text=True)
        return ["run", ELMAN, "--generate", "5", "--checkpoint", ck, "--dim", "H=4", "--prime", prime, *flags]

    return build


def text_file(content: str, *extra):
    def build(d):
        (d / "t.txt").write_text(content)
        return ["run", ELMAN, "--train", "--task", "text", "--text", str(d / "t.txt"), "--quiet",
                "--steps", "1", *extra]  # fmt: skip

    return build


def fine_tune_with_wrong_shapes(d):
    p = npz(d, "p.npz", **{"param/W": np.zeros((3, 3)), "param/U": np.zeros((4, 2)),
                           "param/b": np.zeros(4), "param/Vo": np.zeros((1, 4)), "param/c": np.zeros(1)})  # fmt: skip
    return [*TRAIN, "--steps", "2", "--params", p]


def params_and_resume(d):
    ck = checkpoint(d)
    return [*TRAIN, "--steps", "3", "--resume", "--checkpoint", ck, "--params", ck]


big = 10**9
CASES = {
    # --- item 2: data files ---
    "T differs between input and labels": (data_run(ELMAN, **elman_data(y=np.zeros((5, 3), np.int64))),
                                           1, "targets['y'] has 5 steps but inputs['x'] has 6"),
    "B differs between input and labels": (data_run(ELMAN, **elman_data(y=np.zeros((6, 4), np.int64))),
                                           1, "disagree on the batch size: inputs['x'] has 3, targets['y'] has 4"),
    "many_to_one: one label per sequence, another B": (
        data_run(spec("many_to_one"), x=np.zeros((6, 3, 8)), label=np.zeros(4, np.int64)),
        1, "inputs['x'] has 3, targets['label'] has 4"),
    "adding: a per-sequence sum given per step": (
        data_run(spec("adding_lstm"), x=np.zeros((6, 3, 2)), sum=np.zeros((6, 3, 1))),
        1, "'sum' has shape [6, 3, 1]; expected [B, 1]"),
    "adding: B differs": (data_run(spec("adding_lstm"), x=np.zeros((6, 3, 2)), sum=np.zeros((4, 1))),
                          1, "inputs['x'] has 3, targets['sum'] has 4"),
    "seq2seq: decoder input and labels differ": (
        data_run(spec("encoder_decoder"), src=np.zeros((7, 2, 20)), tgt_in=np.zeros((5, 2, 24)),
                 tgt_out=np.zeros((4, 2), np.int64)),
        1, "targets['tgt_out'] has 4 steps but inputs['tgt_in'] has 5"),
    "pyramidal: labels over pairs of frames": (
        data_run(spec("pyramidal"), x=np.zeros((6, 3, 16)), y=np.zeros((4, 3), np.int64)),
        1, "targets['y'] has 4 steps; it runs over pairs of inputs['x']'s 6 steps, so it needs 3"),
    "an .npy renamed .npz": (npy_as_npz, 1, "is a single .npy array, not an .npz archive"),
    "strings": (data_run(ELMAN, **elman_data(x=np.full((6, 3, 27), "a"))), 1, "'x' holds <U1 values, not real numbers"),
    "structured records": (data_run(ELMAN, **elman_data(x=np.zeros((6, 3, 27), [("a", "f4")]))), 1, "'x' holds"),
    "complex data": (data_run(ELMAN, **elman_data(x=np.zeros((6, 3, 27), complex))), 1, "'x' holds complex numbers"),
    "complex params": (params_run(W=np.zeros((64, 64), complex)), 1, "'W' holds complex numbers"),
    "1e300: finite in float64, not in float32": (data_run(ELMAN, **elman_data(x=np.full((6, 3, 27), 1e300))),
                                                 1, "'x' holds 1e+300 at index [0, 0, 0], beyond float32's largest"),
    "1e39 in params": (params_run(W=np.full((64, 64), 1e39)), 1, "'W' holds 1e+39 at index [0, 0], beyond float32"),
    "NaN in params": (params_run(W=np.full((64, 64), np.nan)), 1, "'W' holds NaN or infinity"),
    "a header that claims a terabyte": (header_claims_a_terabyte, 1,
                                        "is truncated or forged: 'x' is [250000000000] float32"),
    "Python objects": (object_array, 1, "holds Python objects in 'x', which rnnc never unpickles"),
    "a member that is no array": (not_an_array, 1, "holds 'notes.txt', which is not an array"),
    "labels out of range": (data_run(ELMAN, **elman_data(y=np.full((6, 3), 27))), 1, "'y' has label 27, outside 0..26"),
    "float labels": (data_run(ELMAN, **elman_data(y=np.zeros((6, 3)))), 1, "'y' holds class labels and must be integers"),
    "no such array": (data_run(ELMAN, y=np.zeros((6, 3), np.int64)), 1, "no array named 'x'"),
    "lengths beyond T": (data_run(ELMAN, **elman_data(), **{"x.lengths": np.array([1, 2, 7])}),
                         1, "'x.lengths' must hold 3 whole numbers in 1..6"),
    "lengths of 0": (data_run(ELMAN, **elman_data(), **{"x.lengths": np.array([0, 2, 6])}),
                     1, "'x.lengths' must hold 3 whole numbers in 1..6"),
    "lengths of a domain that does not exist": (data_run(ELMAN, **elman_data(), **{"q.lengths": np.array([1, 2, 3])}),
                                                1, "'q.lengths' names no sequence domain"),
    "an empty array": (data_run(ELMAN, x=np.zeros((0, 3, 27)), y=np.zeros((0, 3), np.int64)), 1, "'x' is empty"),
    # --- item 3: checkpoints ---
    "metadata is a JSON list": (resume(change=lambda info: [1, 2]), 1, "its metadata is a JSON list, not an object"),
    "metadata is not JSON": (resume(meta=np.frombuffer(b"{oops", np.uint8)),
                             1, "its metadata ('meta') is corrupt"),
    "metadata of another dtype": (resume(meta=np.zeros(3)), 1, "its metadata ('meta') is corrupt"),
    "no rng": (resume(change=without("rng")), 1, "field 'rng' is null"),
    "rng: 5": (resume(change=put("rng", 5)), 1, "field 'rng' is 5"),
    "rng of another generator": (resume(change=rng_state_of_another_generator), 1, "'rng' is not a PCG64 generator state"),
    "step: 'x'": (resume(change=put("step", "x")), 1, "field 'step' is \"x\""),
    "step: true": (resume(change=put("step", True)), 1, "field 'step' is true"),
    "offset: -1e6": (resume(change=put("offset", -1e6)), 1, "field 'offset' is -1000000.0"),
    "offset: -5": (resume(change=put("offset", -5)), 1, "field 'offset' is -5"),
    "chars: 5": (resume(change=put("chars", 5), text=True), 1, "field 'chars' is 5"),
    "chars of another text": (resume(change=put("chars", list("abc")), text=True), 1, "was trained on another text"),
    "carry/s of the wrong shape": (resume(text=True, carry__s=np.zeros((1, 4, 5), np.float32)),
                                   1, "'carry/s' is [1, 4, 5], the model's state is [1, batch, 4]"),
    "carry of a state the model lacks": (resume(text=True, carry__q=np.zeros((1, 4, 4), np.float32)),
                                         1, "'carry/q' is no state this model carries"),
    "param/W of strings": (resume(param__W=np.full((4, 4), "x")), 1, "'param/W' holds <U1 values"),
    "param/W with NaN": (resume(param__W=np.full((4, 4), np.nan, np.float32)), 1, "'param/W' holds NaN or infinity"),
    "param/W missing": (resume(param__W=None), 1, "no parameter 'param/W'"),
    "opt.m/W missing": (resume(**{"opt.m/W": None}), 1, "no parameter 'opt.m/W'"),
    "a negative Adam v": (resume(**{"opt.v/W": np.full((4, 4), -1.0, np.float32)}), 1, "'opt.v/W' (Adam's second moment) holds negative"),
    "--resume with another --batch": (resume_other("--batch", "8"), 1, "trained with --batch 4, and this run has --batch 8"),
    "--resume with another --lr": (resume_other("--lr", "0.5"), 1, "trained with --lr 0.01, and this run has --lr 0.5"),
    "--resume with another optimizer": (resume_other("--optimizer", "sgd"), 1, "--optimizer adam, and this run has --optimizer sgd"),
    "--resume --override with another --batch": (resume_other("--batch", "8", "--override"), 0, ""),
    "--resume and --params": (params_and_resume, 2, "give one of them"),
    "--resume without a checkpoint": (lambda d: [*TRAIN, "--resume", "--checkpoint", str(d / "none.npz")], 2,
                                      "--resume needs an existing --checkpoint"),
    "--params of another shape (fine-tuning)": (fine_tune_with_wrong_shapes, 1, "parameter 'param/W' is [3, 3], the spec says [4, 4]"),
    # --- item 4: numbers on the command line ---
    **{f"{flag} {value}": (lambda d, f=flag, v=value: [*TRAIN, f, v], 2, f"argument {flag}: {words}")
       for flag, value, words in [
           ("--batch", "0", "0 must be at least 1"), ("--batch", "-3", "-3 must be at least 1"),
           ("--seq-len", "0", "0 must be at least 1"), ("--seq-len", "1.5", "'1.5' is not a whole number"),
           ("--steps", "0", "0 must be at least 1"), ("--steps", "ten", "'ten' is not a whole number"),
           ("--checkpoint-every", "0", "0 must be at least 1"), ("--lr", "0", "0 must be a finite number above 0"),
           ("--lr", "-1", "-1 must be a finite number above 0"), ("--lr", "nan", "nan must be a finite number"),
           ("--lr", "inf", "inf must be a finite number"), ("--clip", "nan", "nan must be a finite number"),
           ("--clip", "-1", "-1 must be a finite number, 0 or more"), ("--momentum", "1.5", "1.5 must be at least 0 and below 1"),
           ("--temperature", "nan", "nan must be a finite number"), ("--temperature", "-1", "-1 must be a finite number above 0"),
           ("--seed", "-1", "-1 must be a whole number from 0 to 2**63 - 1"),
       ]},
    "--generate 0": (lambda d: ["run", ELMAN, "--generate", "0"], 2, "argument --generate: 0 must be at least 1"),
    "--repeat 0": (lambda d: ["bench", ELMAN, "--repeat", "0"], 2, "argument --repeat: 0 must be at least 1"),
    "bench --batch 0": (lambda d: ["bench", ELMAN, "--batch", "0"], 2, "argument --batch: 0 must be at least 1"),
    "--samples 0": (lambda d: ["gradcheck", ELMAN, "--samples", "0"], 2, "0 must be at least 1"),
    "--unroll 0": (lambda d: ["graph", ELMAN, "--unroll", "0"], 2, "argument --unroll: 0 must be at least 1"),
    "--tbptt (removed: --seq-len is the window)": (lambda d: [*TRAIN, "--tbptt", "5"], 2, "unrecognized arguments: --tbptt"),
    "--text of an empty file": (text_file(""), 2, "is empty"),
    "--text too short to learn from": (text_file("abc"), 1, "the text is too short to train on"),
    "--text too short for the windows": (text_file("ab" * 300), 2, "has 600 characters; --seq-len 64 at --batch 32 needs at least"),
    "--prime outside the vocabulary": (generate_with_prime("the Z"), 2, "--prime or --end has characters the model was not trained on: 'Z'"),
    "--end outside the vocabulary": (generate_with_prime("the ", "--decode", "beam", "--end", "Q"), 2,
                                     "--prime or --end has characters the model was not trained on: 'Q'"),
    # --- item 5: memory, checked before allocating (the limit is fixed at 8 GiB below) ---
    "--seq-len 1e7": (lambda d: ["run", RNN, "--train", "--task", "adding", "--seq-len", "1e7"], 1,
                      "training adding_rnn at batch 32 over 10,000,000 steps needs about"),
    "T = 2e6 at B = 4 (LSTM, H=128)": (lambda d: ["run", spec("adding_lstm"), "--train", "--task", "adding", "--batch", "4",
                                                 "--seq-len", "2000000", "--dim", "H=128"], 1, "and this machine has 8.0 GiB free"),
    "--dim H=30000 (training)": (lambda d: ["run", ELMAN, "--train", "--task", "text", "--dim", "H=30000"], 1, "needs about"),
    "--dim H=30000 (bench)": (lambda d: ["bench", ELMAN, "--dim", "H=30000"], 1, "needs about"),
    "--dim H=100000: a param past the limit": (lambda d: ["check", ELMAN, "--dim", "H=100000"], 1, "has 10,000,000,000 entries"),
    "gradcheck --steps 1e8": (lambda d: ["gradcheck", ELMAN, "--steps", "1e8"], 1, "needs about"),
    "run on data too big for memory": (lambda d: ["run", ELMAN, "--dim", "H=20000", "--data",
                                                  npz(d, "d.npz", **elman_data(T=2000, B=64))], 1, "needs about"),
    "--dim with a bad value": (lambda d: ["check", ELMAN, "--dim", "H=1e99"], 2, "--dim H=1e99: write NAME=N"),
}


@pytest.fixture
def memory_limit(monkeypatch):
    monkeypatch.setenv("RNNC_MEMORY_LIMIT", str(8 * 2**30))  # the same answer on every machine


@pytest.mark.parametrize("case", CASES)
def test_hostile_case(case, tmp_path, capsys, memory_limit):
    build, code, words = CASES[case]
    args = build(tmp_path)
    capsys.readouterr()
    got = main(args)
    err = capsys.readouterr().err
    assert got == code, err
    assert words in err and "internal error" not in err and "Traceback" not in err


def test_a_zip_bomb_is_refused_by_size_before_loading(tmp_path, capsys):
    args = zip_bomb(tmp_path)
    assert os.path.getsize(tmp_path / "d.npz") < 2 * 2**20
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "unpacks 'x' from" in err and "a zip bomb?" in err


@pytest.mark.parametrize("fill, code", [("zeros", 1), ("normal", 0)])
def test_the_bomb_check_weighs_the_ratio_of_large_deflated_members(tmp_path, capsys, monkeypatch, fill, code):
    """With the size threshold lowered to 1 MiB, 2.7 MB of deflated zeros (ratio ~1000) is a bomb;
    2.7 MB of deflated random numbers (ratio ~1.07) is not."""
    import rnnc.files

    monkeypatch.setattr(rnnc.files, "BOMB_SIZE", 2**20)
    data = elman_data(T=200, B=64)
    if fill == "zeros":
        data["x"] = np.zeros_like(data["x"])
    path = str(tmp_path / "d.npz")
    np.savez_compressed(path, **data)
    assert main(["run", ELMAN, "--data", path]) == code
    assert ("a zip bomb?" in capsys.readouterr().err) == (code == 1)


def test_compressed_data_below_the_bomb_size_loads(tmp_path):
    """np.savez_compressed of highly compressible data is a normal file, not a bomb."""
    data = elman_data(T=200, B=64)
    data["x"] = np.zeros_like(data["x"])
    path = str(tmp_path / "d.npz")
    np.savez_compressed(path, **data)
    assert main(["run", ELMAN, "--data", path]) == 0


def test_a_data_file_larger_than_memory_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    path = npz(tmp_path, "d.npz", **elman_data(T=200, B=64))
    monkeypatch.setenv("RNNC_MEMORY_LIMIT", str(2**20))
    assert main(["run", ELMAN, "--data", path]) == 1
    assert "data file '" in (err := capsys.readouterr().err) and "needs about" in err


def test_float64_accepts_what_float32_cannot_hold(tmp_path):
    path = npz(tmp_path, "d.npz", **elman_data(x=np.full((6, 3, 27), 1e300)))
    assert main(["run", ELMAN, "--data", path, "--float64"]) == 0


def test_the_python_api_names_the_arrays_that_disagree():
    m = compile_spec(spec("pyramidal"))
    p = m.init_params(0)
    x = np.zeros((6, 3, 16), np.float32)
    with pytest.raises(ValueError, match=r"targets\['y'\] has 4 steps; .* so it needs 3"):
        m.loss(p, {"x": x}, {"y": np.zeros((4, 3), np.int64)})
    with pytest.raises(KeyError, match=r"inputs\['x'\] is missing"):
        m.forward(p, {})
    with pytest.raises(ValueError, match=r"inputs\['x'\] has shape \[6, 3, 15\]; expected \[T, B, 16\]"):
        m.forward(p, {"x": np.zeros((6, 3, 15))})
    assert m.loss(p, {"x": x}, {"y": np.zeros((3, 3), np.int64)})["loss"] > 0
    assert m.loss(p, {"x": x[:7]}, {"y": np.zeros((3, 3), np.int64)})["loss"] > 0


def test_check_prints_the_memory_a_run_needs(capsys):
    assert main(["check", spec("lstm")]) == 0
    out = capsys.readouterr().out
    assert "memory at T=100, B=32 in float32: forward" in out and "a training step" in out


def test_an_endless_file_as_a_spec_or_an_import_is_refused_by_size(tmp_path):
    """/dev/zero is read no further than the spec size limit, not forever (a subprocess with a
    time limit, so that a regression fails instead of hanging the run)."""
    import subprocess
    import sys

    spec = tmp_path / "m.rnn"
    spec.write_text('use X from "/dev/zero"\n\nmodel m {\n  dim I = 2\n  input x[I] : sequence\n}\n')
    for path in ("/dev/zero", str(spec)):
        r = subprocess.run([sys.executable, "-m", "rnnc.cli_entry", "check", path], capture_output=True,
                           text=True, timeout=60, cwd=os.path.join(os.path.dirname(__file__), ".."))  # fmt: skip
        assert r.returncode == 1 and "error[E100]" in r.stderr and "the limit is 1000000" in r.stderr
