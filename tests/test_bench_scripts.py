"""The benchmark scripts still run and still check what they time (they are not timed here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


@pytest.mark.parametrize("system", ["rnnc", "native", "torch", "jax", "ort"])
def test_peer_benchmark_workers_agree_with_torch(system):
    """bench/peers.py: each system's worker checks its outputs and gradients against
    PyTorch's with the same weights before timing; at float32 they agree to 1e-5."""
    pytest.importorskip("torch", reason="the peers are checked against PyTorch")
    needs = {"jax": "jax", "ort": "onnxruntime", "native": "numba"}.get(system)
    if needs:
        pytest.importorskip(needs, reason=f"{needs} is in the peers extra only")
    points = json.dumps([["lstm", "small"], ["gru", "small"]])
    p = subprocess.run([sys.executable, os.path.join(BENCH, "peers.py"), "--worker", system, points, "1"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    modes = {"ort": ["forward"]}.get(system, ["forward", "training"])
    assert [(r["cell"], r["mode"]) for r in rows] == [(c, m) for c in ("lstm", "gru") for m in modes]
    assert all(r["err"] < 1e-5 and r["ms"] > 0 for r in rows), rows


@pytest.mark.parametrize("system", ["rnnc", "native", "loop", "compile", "jax"])
def test_custom_cell_workers_agree_with_the_pytorch_loop(system):
    """bench/peers.py --custom: the library's MGU in rnnc, under torch.compile and in JAX
    gives the hand-written PyTorch loop's outputs and gradients (float32, 1e-5)."""
    pytest.importorskip("torch", reason="the custom cells are checked against a PyTorch loop")
    if system == "jax":
        pytest.importorskip("jax", reason="jax is in the peers extra")
    if system == "native":
        pytest.importorskip("numba", reason="the native target needs numba")
    p = subprocess.run([sys.executable, os.path.join(BENCH, "peers.py"), "--worker", system,
                        json.dumps([["mgu", "small"]]), "1"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["mode"] for r in rows] == ["forward", "training"]
    assert all(r["err"] < 1e-5 for r in rows), rows


def test_attention_experiment_runs_and_writes_its_table(tmp_path):
    """bench/attention_experiment.py at a toy budget: three models trained, decoded greedily
    and by beam search, a table per method and the numbers as JSON."""
    out = tmp_path / "a.json"
    p = subprocess.run([sys.executable, os.path.join(BENCH, "attention_experiment.py"), "--steps", "3", "--per", "2",
                        "--max-len", "3", "--hidden", "8", "--out", str(out)], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| model | 1 | 2 | 3 | all |" in p.stdout and "beam search, width 4:" in p.stdout
    rows = json.loads(out.read_text())["results"]
    assert [r["name"] for r in rows] == ["plain", "additive", "dot"]
    assert all(0 <= acc <= 1 for r in rows for m in ("greedy", "beam") for acc in r[m].values())


def test_attention_errors_script_reports_round_off():
    p = subprocess.run([sys.executable, os.path.join(BENCH, "attention_errors.py")], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in p.stdout.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["attention_additive", "attention_dot", "self_attention"]
    for r in rows:
        loss, grads, fd = (float(x) for x in r[1:4])
        assert loss < 1e-13 and grads < 1e-12 and fd < 1e-6, r


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_the_hand_written_yardstick_equals_the_numpy_target(kind):
    """bench/handwritten.py (tuned: folded sigmoids, in-place steps, chunked derivative
    factors; no rnnc code) gives the bench layers' loss and gradients in float64, over lengths
    that end inside a chunk of its backward loop and at its edge."""
    import numpy as np

    sys.path.insert(0, BENCH)
    from handwritten import CHUNK, IMPLS, from_spec

    from rnnc.compiler import compile_spec

    m = compile_spec(os.path.join(BENCH, "specs", f"{kind}_layer.rnn"), dims={"I": 5, "H": 7})
    rng = np.random.default_rng(0)
    params = {k: v + rng.normal(0, 0.3, v.shape) for k, v in m.init_params(0, np.float64).items()}
    for T in (2, CHUNK, 2 * CHUNK + 3):
        x, y = rng.normal(size=(T, 3, 5)), rng.normal(size=(T, 3, 7))
        loss, grads = m.loss_and_grads(params, {"x": x}, {"y": y})
        loss_h, grads_h = IMPLS[kind](from_spec(kind, params), x, y)
        assert abs(loss_h - loss) <= 1e-13 * abs(loss)
        want = from_spec(kind, grads)  # the gradients in the hand-written layout
        for k, g in grads_h.items():
            assert np.abs(g - want[k]).max() <= 1e-12 * np.abs(want[k]).max(), (kind, T, k)
        assert np.allclose(IMPLS[kind](from_spec(kind, params), x, y, backward=False)[0], loss, rtol=1e-13)
