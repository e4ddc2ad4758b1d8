"""Exit codes and what each command prints."""

from __future__ import annotations

import os
import re
import shutil
import sys

import numpy as np
import pytest

from rnnc.cli import main
from rnnc.compiler import compile_spec
from rnnc.errors import RnncError

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")
ELMAN = os.path.join(SPECS, "elman.rnn")


def test_check_summary(capsys):
    assert main(["check", os.path.join(SPECS, "tagger.rnn")]) == 0
    out = capsys.readouterr().out
    assert "515,338 parameters" in out  # the library LSTM: PyTorch layout, two biases per gate
    assert "recurrence (backward over x, reads t+1)" in out
    assert "states: h1.bwd.c" in out


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["check"]) == 2
    assert main(["check", ELMAN, "--dim", "H=zero"]) == 2
    assert main(["check", ELMAN, "--dim", "Q=3"]) == 2
    assert main(["frobnicate"]) == 2


def test_missing_file_exits_1(capsys):
    assert main(["check", "/nonexistent/x.rnn"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_fmt_check_and_write(tmp_path, capsys):
    p = tmp_path / "m.rnn"
    p.write_text("model m {dim H=4\n input x[H]:sequence # note\n}\n")
    assert main(["fmt", "--check", str(p)]) == 1
    assert main(["fmt", "--write", str(p)]) == 0
    assert main(["fmt", "--check", str(p)]) == 0
    assert "# note" in p.read_text()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".rnnc-")]


def test_graph_dot_and_unrolled(tmp_path, capsys):
    out = tmp_path / "g.dot"
    assert main(["graph", ELMAN, "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith('digraph "elman"') and 'label="t-1"' in text and "style=dashed" in text
    assert main(["graph", os.path.join(SPECS, "birnn.rnn"), "--unroll", "3"]) == 0
    dot = capsys.readouterr().out
    assert "rankdir=BT" in dot and "t = 2" in dot and "constraint=false" in dot


def test_graph_png_needs_graphviz(tmp_path, capsys):
    code = main(["graph", ELMAN, "-o", str(tmp_path / "g.png")])
    if shutil.which("dot"):
        assert code == 0 and (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert code == 1 and "Graphviz" in capsys.readouterr().err


def test_grad_prints_bptt_recurrences(capsys):
    assert main(["grad", ELMAN, "--dim", "H=4", "--dim", "V=3"]) == 0
    out = capsys.readouterr().out
    assert "for t = T-1 down to 0 over x:" in out
    assert "dW = Σ_t,b" in out


def test_gradcheck_passes_and_reports(capsys):
    assert main(["gradcheck", os.path.join(SPECS, "gru.rnn"), "--dim", "H=3", "--dim", "V=4"]) == 0
    out = capsys.readouterr().out
    assert "largest relative error" in out and "ok" in out


def test_run_forward_and_loss(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.normal(size=(7, 3, 27)), y=rng.integers(0, 27, (7, 3)))
    out = tmp_path / "o.npz"
    assert main(["run", ELMAN, "--data", str(data), "-o", str(out)]) == 0
    with np.load(out) as z:
        assert z["o"].shape == (7, 3, 27) and np.isfinite(z["loss"])


@pytest.mark.parametrize("bad,msg", [
    ({"x": np.zeros((7, 3, 26))}, "has shape [7, 3, 26]; expected [T, B, 27]"),
    ({"x": np.full((7, 3, 27), np.nan)}, "NaN"),
    ({"x": np.zeros((7, 3, 27)), "y": np.full((7, 3), 30)}, "label 30, outside 0..26"),
    ({"z": np.zeros(3)}, "no array named 'x'"),
])  # fmt: skip
def test_run_bad_data(tmp_path, capsys, bad, msg):
    data = tmp_path / "d.npz"
    np.savez(data, **bad)
    assert main(["run", ELMAN, "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_run_corrupt_and_empty_files(tmp_path, capsys):
    for content in (b"", b"PK\x03\x04garbage"):
        data = tmp_path / "d.npz"
        data.write_bytes(content)
        assert main(["run", ELMAN, "--data", str(data)]) == 1
        assert "not a readable .npz" in capsys.readouterr().err


def test_unused_inputs_and_params_are_warnings(tmp_path, capsys):
    p = tmp_path / "w.rnn"
    p.write_text("model m {\n  dim H = 2\n  input x[H] : sequence\n  input z[H] : sequence\n"
                 "  param W[H, H], spare[H]\n  s = tanh(W @ x + s[t-1])\n}\n")  # fmt: skip
    assert main(["check", str(p)]) == 0
    err = capsys.readouterr().err
    assert "warning[W001]: input 'z' is never used" in err
    assert "warning[W001]: param 'spare' is never used" in err


def test_run_with_saved_params(tmp_path, capsys):
    rng = np.random.default_rng(0)
    from rnnc.compiler import compile_spec

    m = compile_spec(ELMAN)
    params = m.init_params(3)
    np.savez(tmp_path / "p.npz", **params)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(4, 2, 27)), y=rng.integers(0, 27, (4, 2)))
    assert main(["run", ELMAN, "--data", str(tmp_path / "d.npz"), "--params", str(tmp_path / "p.npz"),
                 "-o", str(tmp_path / "o.npz")]) == 0  # fmt: skip
    with np.load(tmp_path / "o.npz") as z:
        want = m.loss(params, {"x": rng.normal(size=(4, 2, 27))}, {"y": np.zeros((4, 2), int)})
        assert z["o"].shape == want["o"].shape
    bad = dict(params, W=np.zeros((3, 3), np.float32))
    np.savez(tmp_path / "bad.npz", **bad)
    assert (
        main(
            ["run", ELMAN, "--data", str(tmp_path / "d.npz"), "--params", str(tmp_path / "bad.npz")]
        )
        == 1
    )
    assert "parameter 'W' is [3, 3], the spec says [64, 64]" in capsys.readouterr().err


def test_gradcheck_fails_when_the_tolerance_is_impossible(capsys):
    code = main(["gradcheck", ELMAN, "--dim", "H=3", "--dim", "V=3", "--tol", "1e-30"])
    assert code == 1 and "FAILED" in capsys.readouterr().out


def test_plot_writes_a_png_or_says_what_is_missing(tmp_path, capsys):
    png = tmp_path / "loss.png"
    code = main(["run", os.path.join(SPECS, "adding_rnn.rnn"), "--train", "--task", "adding", "--steps", "3",
                 "--quiet", "--plot", str(png), "--dim", "H=4"])  # fmt: skip
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 1 and "needs matplotlib" in capsys.readouterr().err
    else:
        assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_bench_against_a_second_spec_prints_both_per_step_and_the_ratio(capsys):
    layer = os.path.join(SPECS, "..", "bench", "specs")
    assert main(["bench", os.path.join(layer, "lstm_vd_layer.rnn"), "--against", os.path.join(layer, "lstm_layer.rnn"),
                 "--steps", "5", "--batch", "2", "--repeat", "2", "--dim", "H=8", "--dim", "I=4"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "T=5, B=2, median of 2; masks drawn in training"
    for line, name in zip(out[1:], ("forward (evaluation)", "forward+backward (training)"), strict=True):
        assert line.startswith(name)
        words = line[28:].split()
        assert words[0] == "lstm_vd_layer" and words[5] == "vs" and words[6] == "lstm_layer"
        ratio = float(words[1]) / float(words[7])
        assert words[-1] == f"{ratio:.2f}x" or abs(float(words[-1][:-1]) - ratio) < 0.02


def test_compile_explain_counts_each_loops_work(capsys):
    """--explain: the GEMM shapes of a step (LSTM: h @ W_hhᵀ forward, dz @ W_hh backward),
    what a step stores (the forward loop's tape: g, o, the merged i and f, c, tanh c and h,
    112 numbers a sequence; the backward loop only dz, its running dh and dc kept as one
    value each), the kernels a step on the CuPy target, and the measured time a step."""
    spec = os.path.join(SPECS, "..", "bench", "specs", "lstm_layer.rnn")
    args = ["compile", spec, "--dim", "I=8", "--dim", "H=16", "--explain", "--batch", "4", "--steps", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    train = out[out.index("loss_and_grads (B=4, T=5):") :]
    fwd, back = (ln for ln in train.splitlines() if ln.startswith("  loop"))
    assert "GEMMs [4x16]·[16x64]" in fwd and f"stores {112 * 4 * 4:,} bytes" in fwd
    assert "GEMMs [4x64]·[64x16]" in back and f"stores {64 * 4 * 4:,} bytes" in back
    assert "9 pointwise ops" in fwd and "estimated" in fwd
    assert re.search(r"measured: \d+ us a step", train)
    assert main([*args, "--target", "cupy"]) == 0
    out = capsys.readouterr().out
    assert out.count("1 fused kernel;") == 3 and "measured" not in out and "estimated" not in out


def test_compile_explain_a_model_without_a_loss(tmp_path, capsys):
    spec = tmp_path / "noloss.rnn"
    spec.write_text("model m {\n  dim I = 3, H = 4\n  input x[I] : sequence\n  param W[H, I], U[H, H]\n"
                    "  h = tanh(W @ x + U @ h[t-1])\n}\n")  # fmt: skip
    assert main(["compile", str(spec), "--explain", "--batch", "2", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "forward (B=2, T=3):" in out and "GEMMs [2x4]·[4x4]" in out and "loss_and_grads" not in out
    assert re.search(r"measured: \d+ us a step", out)


def test_the_native_target_without_numba_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now fails
    code = main(["run", os.path.join(SPECS, "elman.rnn"), "--target", "native", "--train",
                 "--task", "adding", "--steps", "1", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "error[E503]: the native target needs numba" in err
    assert "pip install numba" in err and "Traceback" not in err
    # the code itself is written on any machine
    assert main(["compile", os.path.join(SPECS, "elman.rnn"), "--target", "native"]) == 0
    assert "@native" in capsys.readouterr().out


def test_the_default_target_is_native_where_numba_imports_else_numpy(monkeypatch):
    from rnnc.compiler import default_target

    elman = os.path.join(SPECS, "elman.rnn")
    monkeypatch.delenv("RNNC_TARGET")  # the suite's own setting (conftest.py)
    pytest.importorskip("numba", reason="numba is a dependency; this checks the default with it")
    assert default_target() == "native" and compile_spec(elman, load=False).target == "native"
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now fails: no native target
    assert default_target() == "numpy" and compile_spec(elman).target == "numpy"
    monkeypatch.setenv("RNNC_TARGET", "native")  # named, it is required
    with pytest.raises(RnncError, match="the native target needs numba"):
        compile_spec(elman)
    monkeypatch.setenv("RNNC_TARGET", " numpy ")
    assert compile_spec(elman).target == "numpy"


def test_rnnc_target_names_the_default_and_a_wrong_one_is_misuse(monkeypatch, capsys):
    pytest.importorskip("numba", reason="the native target needs numba")
    elman = os.path.join(SPECS, "elman.rnn")
    monkeypatch.delenv("RNNC_TARGET")
    run = ["run", os.path.join(SPECS, "adding_rnn.rnn"), "--train", "--task", "adding", "--steps", "2",
           "--batch", "4", "--quiet"]
    assert main(run) == 0
    assert "(native target)" in capsys.readouterr().out
    assert main([*run, "--target", "numpy"]) == 0
    assert "(numpy target)" in capsys.readouterr().out
    monkeypatch.setenv("RNNC_TARGET", "numpy")
    assert main(run) == 0
    assert "(numpy target)" in capsys.readouterr().out
    monkeypatch.setenv("RNNC_TARGET", "gpu")
    assert main(run) == 2
    err = capsys.readouterr().err
    assert "RNNC_TARGET='gpu' is not a target" in err and "numpy, native, cupy" in err
    with pytest.raises(RnncError, match="RNNC_TARGET='gpu'") as e:
        compile_spec(elman)
    assert e.value.code == "E502"
