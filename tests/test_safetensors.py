""".safetensors for params, data, outputs and checkpoints (issue 15, item 4): chosen by the
file's extension, written atomically, and refused in words, naming the entry, when a file is
anything but plain tensors NumPy holds exactly."""

from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="needs safetensors (pip install '.[test]')")

from rnnc.cli import main
from rnnc.files import load_arrays, save_arrays

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")
ELMAN = os.path.join(SPECS, "elman.rnn")
TRAIN = ["run", os.path.join(SPECS, "adding_rnn.rnn"), "--train", "--task", "adding", "--seq-len", "8",
         "--batch", "4", "--dim", "H=4", "--quiet", "--float64"]  # fmt: skip


def test_arrays_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(3, 4)), "b": rng.integers(0, 9, 5), "c": np.float32([1.5]),
              "d": np.array([True, False]), "e": np.zeros((0, 3))}  # fmt: skip
    path = str(tmp_path / "x.safetensors")
    save_arrays(path, arrays)
    back = load_arrays(path)
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_training_checkpoints_and_params_in_safetensors(tmp_path):
    ck, out = str(tmp_path / "ck.safetensors"), str(tmp_path / "p.safetensors")
    assert main([*TRAIN, "--steps", "6", "--checkpoint", ck, "-o", out]) == 0
    assert main([*TRAIN, "--steps", "10", "--checkpoint", ck, "--resume", "-o", out]) == 0
    ref_ck, ref = str(tmp_path / "ck.npz"), str(tmp_path / "p.npz")
    assert main([*TRAIN, "--steps", "10", "--checkpoint", ref_ck, "-o", ref]) == 0
    a, b = load_arrays(out), load_arrays(ref)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)  # resumed = straight
    # the parameters start another run, and a model's outputs can be written as safetensors
    data = str(tmp_path / "d.safetensors")
    rng = np.random.default_rng(1)
    save_arrays(data, {"x": rng.normal(size=(8, 3, 2)), "sum": rng.normal(size=(3, 1))})
    assert main(["run", os.path.join(SPECS, "adding_rnn.rnn"), "--dim", "H=4", "--data", data,
                 "--params", out, "-o", str(tmp_path / "o.safetensors"), "--float64"]) == 0  # fmt: skip
    assert "loss" in load_arrays(str(tmp_path / "o.safetensors"))


def raw_file(header: dict, body: bytes = b"", claim: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if claim is None else claim) + h + body


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CASES = {
    "random bytes": (b"\x01\x02not a safetensors file at all", "its header claims"),
    "header longer than the file": (raw_file({"W": F32}, bytes(8), claim=10**9), "its header claims 1,000,000,000 bytes"),
    "header not JSON": (struct.pack("<Q", 6) + b"{nope}" + bytes(8), "its header is not JSON"),
    "header a list": (raw_file([1, 2]), "not a table of tensors"),  # type: ignore[arg-type]
    "bfloat16": (raw_file({"W": {**F32, "dtype": "BF16", "data_offsets": [0, 4]}}, bytes(4)),
                 "entry 'W' of dtype BF16, which NumPy cannot hold exactly"),
    "an extra field": (raw_file({"W": {**F32, "pickle": "x"}}, bytes(8)), "entry 'W' that is not a plain tensor"),
    "offsets outside": (raw_file({"W": {**F32, "data_offsets": [0, 800]}}, bytes(8)),
                        "entry 'W' whose data lies outside the file"),
    "shape vs bytes": (raw_file({"W": {**F32, "shape": [3]}}, bytes(8)), "entry 'W' of shape [3] (12 bytes) stored in 8"),
    "negative size": (raw_file({"W": {**F32, "shape": [-2]}}, bytes(8)), "entry 'W' whose shape is not a list"),
    "metadata not strings": (raw_file({"__metadata__": {"a": 1}, "W": F32}, bytes(8)), "__metadata__ entry"),
    "overlapping tensors": (raw_file({"W": F32, "V": F32}, bytes(8)), "not a readable .safetensors file"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_damaged_or_foreign_safetensors_are_refused_naming_the_entry(case, tmp_path, capsys):
    raw, words = CASES[case]
    path = tmp_path / "p.safetensors"
    path.write_bytes(raw)
    code = main(["run", ELMAN, "--data", str(path)])
    err = capsys.readouterr().err
    assert code == 1 and "error[E505]" in err and words in err, err
    assert "internal error" not in err


def test_without_the_package_the_refusal_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    assert main(["run", ELMAN, "--dim", "H=4", "--train", "--task", "text", "--steps", "1", "--quiet",
                 "-o", str(tmp_path / "p.safetensors")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "error[E507]" in err and "pip install 'rnnc[safetensors]'" in err
