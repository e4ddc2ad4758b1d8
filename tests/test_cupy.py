"""The CuPy target. Without a GPU (as in CI): every spec's generated kernels compile to PTX
with nvcc; the whole generated CuPy module runs against a stand-in cupy (NumPy arrays, the
kernels compiled as host C++, hostcuda.py) and equals the NumPy target; the command line says
what is missing. With a GPU (`-m gpu`): the same comparisons on the device with real CuPy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import random_data, rel, small_dims
from hostcuda import have_compiler, load_with_fake_cupy
from hypothesis import given, settings
from strategies import cells

from rnnc.compiler import compile_spec
from rnnc.errors import RnncError
from rnnc.format import format_program
from rnnc.fuse import Kernel
from rnnc.ops import OPS

ROOT = os.path.join(os.path.dirname(__file__), "..")
SPECS = sorted(os.path.join(ROOT, "specs", f) for f in os.listdir(os.path.join(ROOT, "specs")))
needs_gxx = pytest.mark.skipif(not have_compiler(), reason="g++ is not installed")


def kernel_units(source: str) -> dict[str, str]:
    """The CUDA translation unit of a generated module for each dtype, as CuPy compiles it."""
    ns: dict = {}
    start, stop = source.index("PRELUDE = "), source.index("@functools.cache")
    exec(source[start:stop], ns)
    return {real: f"typedef {real} real;\n" + ns["PRELUDE"] + "\n".join(ns["KERNELS"].values())
            for real in ("float", "double")}  # fmt: skip


def cupy_source(path: str, dims=None) -> str:
    return compile_spec(path, target="cupy", dims=dims, load=False).source


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_every_specs_kernels_compile_to_ptx():
    jobs = []
    folder = tempfile.mkdtemp(prefix="rnnc-ptx-")
    for path in SPECS:
        for real, unit in kernel_units(cupy_source(path)).items():
            cu = os.path.join(folder, f"{os.path.basename(path)}.{real}.cu")
            with open(cu, "w") as f:
                f.write(unit)
            jobs.append(cu)

    def nvcc(cu: str):
        r = subprocess.run(["nvcc", "--ptx", "-o", cu + ".ptx", cu], capture_output=True, text=True)
        return cu, r.returncode, r.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(nvcc, jobs))
    failed = [(cu, err) for cu, rc, err in results if rc != 0]
    assert not failed, failed[0]
    for cu, _, _ in results:  # one .entry per kernel: nothing was dropped
        with open(cu) as f:
            n = f.read().count('extern "C" __global__')
        with open(cu + ".ptx") as f:
            assert f.read().count(".entry") == n > 0, cu
    shutil.rmtree(folder)


def nvrtc_or_none():
    """CuPy's runtime compiler binding, where CuPy and libnvrtc are installed (no GPU needed)."""
    try:
        import cupy

        cupy.cuda.nvrtc.getVersion()
        return cupy.cuda.nvrtc
    except Exception:
        return None


@pytest.mark.skipif(nvrtc_or_none() is None, reason="CuPy with NVRTC is not installed")
def test_every_specs_kernels_compile_with_nvrtc():
    """NVRTC is what cupy.RawKernel compiles with on the device: no headers, its own builtins."""
    nvrtc = nvrtc_or_none()
    for path in SPECS:
        for real, unit in kernel_units(cupy_source(path)).items():
            prog = nvrtc.createProgram(unit, "k.cu", [], [])
            try:
                nvrtc.compileProgram(prog, ["-arch=compute_90"])
            except Exception as e:
                pytest.fail(f"{path} ({real}): {e}\n{nvrtc.getProgramLog(prog)}")
            n = unit.count('extern "C" __global__')
            assert nvrtc.getPTX(prog).count(b".entry") == n > 0, (path, real)
            nvrtc.destroyProgram(prog)


def test_loop_bodies_become_one_kernel_per_phase():
    """LSTM: forward one GEMM + one kernel a step; backward one kernel + one GEMM."""
    m = compile_spec(os.path.join(ROOT, "specs", "lstm.rnn"), target="cupy", load=False)
    src = m.source
    fwd = src[src.index("def forward(") : src.index("def loss(")]
    loop = fwd[fwd.index("    for t in range(") :].split("\n    out =")[0]
    code = [line.strip() for line in loop.splitlines()[1:] if not line.strip().startswith("#")]
    assert sum(line.startswith("launch(") for line in code) == 1, code
    assert sum(" @ " in line for line in code) == 1, code
    body = src[src.index("def loss_and_grads(") :]
    back = body[body.index("for t in range(T_x - 1, -1, -1):") :].split("\n    del", 1)[0]
    code = [line.strip() for line in back.splitlines()[1:] if not line.strip().startswith("#")]
    assert sum(line.startswith("launch(") for line in code) == 1, code
    assert sum(" @ " in line for line in code) == 1, code
    assert "import cupy as cp" in src and "\nimport rnnc" not in src


@needs_gxx
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("name", ["lstm_vd_layer", "ln_lstm_layer"])
def test_dropout_and_layernorm_steps_are_one_gemm_and_one_kernel(name, lengths):
    """Variational dropout on h[t-1]: the step's first kernel (the dropped h forward, the
    gates' adjoints backward) reads only the step before, so the last kernel of step t does
    its work for step t+1 (fuse.rotated): one launch a step, plus one for the first step.
    Layer norm: the kernel reduces over rows, one block of threads per sequence, so the
    norms of the gates and of the cell are in the step's one kernel. Both equal the NumPy
    target with drawn masks, lengths and a carried state."""
    spec = os.path.join(ROOT, "bench", "specs", f"{name}.rnn")
    dims = {"I": 5, "H": 4}
    mn = compile_spec(spec, dims=dims)
    mc = load_with_fake_cupy(cupy_source(spec, dims))
    T, B = 7, 3
    _Ts, params, inputs, targets, L = random_data(mn.graph, T, B, seed=11, lengths=lengths)
    assert set(mn.masks) <= set(inputs) and len(mn.masks) == (2 if "vd" in name else 0)
    _, _, carry = mn.loss_and_grads(params, inputs, targets, return_carry=True)
    for function in ("forward", "loss_and_grads"):
        mc.fake.counts.clear()
        args = (params, inputs) if function == "forward" else (params, inputs, targets)
        want = getattr(mn, function)(*args, lengths=L, carry=carry)
        got = getattr(mc, function)(*args, lengths=L, carry=carry)
        if function == "forward":
            assert rel(got["h"].get(), want["h"]) < 1e-12
        else:
            assert abs(got[0] - want[0]) <= 1e-12 * abs(want[0])
            for k in want[1]:
                assert rel(got[1][k].get(), want[1][k]) < 1e-12, k
        launches = sorted(k.launches for k in mc.fake.counts.values())
        loops = 1 if function == "forward" else 2
        first = [1] * loops if "vd" in name else []  # the first step's, before the loop
        assert launches == first + [T] * loops, launches
        if "ln" in name:  # a block of threads per sequence, each thread one column of h
            assert all(k.blocks == {4} for k in mc.fake.counts.values())
    m = compile_spec(spec, dims=dims, target="cupy", load=False)
    if "vd" in name:
        body = m.source[m.source.index("def loss_and_grads(") :]
        assert "tn = min(t + 1, T_x - 1)" in body and "tn = max(t - 1, 0)" in body
        assert "if (more) " in m.source
    else:
        assert m.source.count("__shared__ real rnnc_red[4]") == 6  # forward, loss, 2 x 2 loops


ROW_OPS = sorted(n for n, op in OPS.items() if op.cuda_row)
GRADIENT_OF = {"layernorm_d": "layernorm", "rmsnorm_d": "rmsnorm"}  # ops only in gradients


def test_every_reduction_over_features_has_a_row_rule():
    from rnnc.ops import over_features

    reductions = {
        n for n, op in OPS.items() if getattr(op.shape, "__wrapped__", op.shape) is over_features
    }
    assert reductions == {"sum_f", "mean", "var", "max", "min"}
    assert set(ROW_OPS) == reductions | {"layernorm", "layernorm_d", "rmsnorm", "rmsnorm_d"}


@needs_gxx
@pytest.mark.parametrize("name", ROW_OPS)
def test_every_row_reduction_fuses_and_equals_numpy(name):
    """Each op with a cuda_row rule, inside a recurrence: it is computed in the step's kernel
    (forward, and backward where its gradient reduces too), equal to the NumPy target."""
    user = GRADIENT_OF.get(name, name)
    spelling = OPS[user].spelling or user
    use = f"{spelling}(a)" if OPS[user].shape((4,)) == (4,) else f"{spelling}(a) * a"
    text = f"""model m {{
  dim I = 3, H = 4
  input x[I] : sequence
  target y[H] : sequence
  param W[H, I], U[H, H]
  a = W @ x + U @ h[t-1]
  h = tanh({use} + 0.5 * a)
  loss = mse(h, y)
}}
"""
    mn = compile_spec(text)
    src = compile_spec(text, target="cupy", load=False).source
    mc = load_with_fake_cupy(src)
    _Ts, params, inputs, targets, L = random_data(mn.graph, 5, 3, seed=2, lengths=True)
    loss, grads = mn.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    loss_c, grads_c = mc.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    assert abs(loss_c - loss) <= 1e-12 * abs(loss)
    for k in grads:
        assert rel(grads_c[k].get(), grads[k]) < 1e-12, k
    body = src[src.index("def loss_and_grads(") : src.index("def loss_and_all_grads(")]
    loops = [loop_body(body, "for t in range(T_x):")]
    if name not in ("max", "min"):  # max's gradient (a one-hot of the argmax) is array code
        loops.append(loop_body(body, "for t in range(T_x - 1, -1, -1):"))
    for lines in loops:  # GEMMs and one launch, with a block of threads a sequence
        assert [ln for ln in lines if not re.fullmatch(ROW_READ_GEMM_STORE, ln)] \
            == [next(ln for ln in lines if ln.startswith("launch("))], lines  # fmt: skip
        assert "block=4" in lines[-1] or any("block=4" in ln for ln in lines)


ROW_READ_GEMM_STORE = r"\w+_t = (\w+\[t\]|.* @ \w+(\.T)?)|\w+\[(t( [+-] \d+)?|t % 2)\] = \w+_t"


def loop_body(code: str, head: str) -> list[str]:
    """The statements of the loop that starts with `head` (comments left out)."""
    rest = code[code.index(head) :].splitlines()[1:]
    body = [ln for ln in rest[: next(i for i, ln in enumerate(rest) if not ln.startswith(" " * 8))]]
    return [ln.strip() for ln in body if not ln.strip().startswith("#")]


def test_gru_backward_adds_its_gemm_into_the_kernels_row():
    """dh[t-1] = dh·z + Uᵀ·dgates: the kernel writes dh·z into dh[t-1]'s row and cuBLAS adds
    the product there (beta = 1), so the step is one kernel and one GEMM, not two kernels."""
    src = compile_spec(os.path.join(ROOT, "specs", "gru.rnn"), target="cupy", load=False).source
    body = src[src.index("def loss_and_grads(") :]
    back = body[body.index("for t in range(T_x - 1, -1, -1):") :].split("\n    del", 1)[0]
    code = [line.strip() for line in back.splitlines()[1:] if not line.strip().startswith("#")]
    assert sum(line.startswith("launch(") for line in code) == 1, code
    gemm = [line for line in code if "cublas.gemm(" in line]
    assert len(gemm) == 1 and "beta=1.0" in gemm[0] and " @ " not in "".join(code), code
    assert "from cupy import cublas" in src


def test_fusion_names_values_after_the_numpy_code_and_quotes_equations():
    m = compile_spec(os.path.join(ROOT, "bench", "specs", "gru_layer.rnn"), target="cupy",
                     load=False)  # fmt: skip
    units = kernel_units(m.source)["float"]
    assert "// h = (1 - z) * n + z * h[t-1]" in units
    assert "const real h_n_0 = tanh(" in units


def test_kernels_are_planned_for_every_loop_of_every_spec():
    from rnnc.fuse import loop_kernels
    from rnnc.schedule import Loop

    for path in SPECS:
        m = compile_spec(path, dims=small_dims(path))
        for fname, plan in m.plans.items():
            fused = loop_kernels(plan, fname, str)
            loops = [i for i, s in enumerate(plan.steps) if isinstance(s, Loop)]
            assert sorted(fused) == loops
            for items in fused.values():
                assert any(isinstance(k, Kernel) for k in items), (path, fname)


@needs_gxx
@pytest.mark.parametrize("lengths", [False, True])
def test_cupy_module_equals_numpy_for_every_spec(spec, lengths):
    dims = small_dims(spec)
    mn = compile_spec(spec, dims=dims)
    mc = load_with_fake_cupy(cupy_source(spec, dims))
    _Ts, params, inputs, targets, L = random_data(mn.graph, 6, 3, seed=3, lengths=lengths)
    loss, grads = mn.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    loss_c, grads_c = mc.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    assert abs(loss_c - loss) <= 1e-10 * abs(loss)
    assert set(grads_c) == set(grads)
    for name in grads:
        assert rel(grads_c[name].get(), grads[name]) < 1e-10, name
    out, out_c = mn.forward(params, inputs, lengths=L), mc.forward(params, inputs, lengths=L)
    for name in out:
        assert rel(out_c[name].get(), out[name]) < 1e-10, name
    assert mc.fake.counts, "no kernel ran"


@needs_gxx
def test_a_sum_over_the_steps_kept_running_in_the_loop_equals_numpy():
    """The adjoint of a per-sequence value read every step (P @ img) is summed inside the
    backward loop (schedule.accumulators), from a fused kernel's output on this target."""
    from test_optimize import STATIC_EVERY_STEP

    mn = compile_spec(STATIC_EVERY_STEP)
    source = compile_spec(STATIC_EVERY_STEP, target="cupy", load=False).source
    assert "cp.zeros((B,) + (4,), dt)" in source
    mc = load_with_fake_cupy(source)
    _Ts, params, inputs, targets, L = random_data(mn.graph, 6, 3, seed=3, lengths=True)
    loss, grads = mn.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    loss_c, grads_c = mc.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    assert abs(loss_c - loss) <= 1e-10 * abs(loss)
    assert all(rel(grads_c[k].get(), grads[k]) < 1e-10 for k in grads)


@needs_gxx
@pytest.mark.parametrize("name", ["lstm.rnn", "gru.rnn", "deep_birnn.rnn"])
def test_cupy_module_float32_within_1e5(name):
    spec = os.path.join(ROOT, "specs", name)
    dims = small_dims(spec)
    mn = compile_spec(spec, dims=dims)
    mc = load_with_fake_cupy(cupy_source(spec, dims))
    _Ts, _, inputs, targets, _ = random_data(mn.graph, 8, 2, seed=4)
    params = mn.init_params(0)
    inputs = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in inputs.items()}
    loss, grads = mn.loss_and_grads(params, inputs, targets)
    loss_c, grads_c = mc.loss_and_grads(params, inputs, targets)
    assert abs(loss_c - loss) <= 1e-5 * abs(loss)
    for k in grads:
        assert grads_c[k].dtype == np.float32
        assert rel(grads_c[k].get(), grads[k]) < 1e-5, k


@needs_gxx
def test_truncated_bptt_carry_through_the_kernels():
    spec = os.path.join(ROOT, "specs", "lstm.rnn")
    dims = small_dims(spec)
    mn = compile_spec(spec, dims=dims)
    mc = load_with_fake_cupy(cupy_source(spec, dims))
    _Ts, params, inputs, targets, _ = random_data(mn.graph, 5, 2, seed=5)
    _, _, carry = mn.loss_and_grads(params, inputs, targets, return_carry=True)  # on the host
    a = mn.loss_and_grads(params, inputs, targets, carry=carry)
    on_device = {k: mc.fake.asarray(v) for k, v in params.items()}
    for p in (params, on_device):  # parameters from a checkpoint, or kept on the device
        b = mc.loss_and_grads(p, inputs, targets, carry=carry)
        assert abs(a[0] - b[0]) <= 1e-10 * abs(a[0])
        assert all(rel(b[1][k].get(), a[1][k]) < 1e-10 for k in a[1])


def same_as_numpy_for_a_random_cell(case, cupy_module) -> None:
    """The NumPy target and the CuPy module `cupy_module(text)` agree to 1e-10."""
    program, opt = case
    text = format_program(program)
    mn = compile_spec(text)
    mc = cupy_module(text)
    _Ts, params, inputs, targets, L = random_data(mn.graph, opt["T"], opt["B"], opt["seed"],
                                                  opt["lengths"])  # fmt: skip
    loss, grads = mn.loss_and_grads(params, inputs, targets, lengths=L)
    loss_c, grads_c = mc.loss_and_grads(params, inputs, targets, lengths=L)
    assert abs(loss_c - loss) <= 1e-10 * max(abs(loss), 1e-30)
    for k in grads:
        assert rel(grads_c[k].get(), grads[k]) < 1e-10, k


def on_host_stand_in(text: str):
    return load_with_fake_cupy(compile_spec(text, target="cupy", load=False).source)


@needs_gxx
@settings(max_examples=12)
@given(cells())
def test_cupy_module_equals_numpy_for_random_cells(case):
    same_as_numpy_for_a_random_cell(case, on_host_stand_in)


def test_the_stand_in_refuses_what_cupy_refuses():
    """The stand-in is only worth its passes if it fails where CuPy would."""
    from hostcuda import fake_cupy

    cp = fake_cupy()
    d, h = cp.asarray(np.ones(3)), np.ones(3)
    for mix in (lambda: d + h, lambda: h * d, lambda: cp.concatenate([d, h]),
                lambda: d.__setitem__(slice(0, 3), h), lambda: np.asarray(d)):  # fmt: skip
        with pytest.raises(TypeError):
            mix()
    with pytest.raises(AttributeError):  # NumPy has it, CuPy 13 does not
        cp.put_along_axis(d, cp.zeros((1,), np.int64), d[:1], axis=0)
    with pytest.raises(AttributeError):
        d.byteswap()  # a NumPy array's method that CuPy arrays lack
    d += cp.ones(3)  # device with device: fine, in place
    assert isinstance(d, cp.ndarray) and isinstance(np.tanh(d), cp.ndarray)
    assert d.get().tolist() == [2.0, 2.0, 2.0] and float(d.sum()) == 6.0


# ----- training and generation on the cupy target (the stand-in as `cupy`) -----


@pytest.fixture
def stand_in_cupy(monkeypatch):
    from hostcuda import fake_cupy

    cp = fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    return cp


def train(tmp_path, target: str, *extra: str) -> dict:
    from rnnc.cli import main

    ck = tmp_path / f"{target}.npz"
    args = ["run", *extra, "--train", "--float64", "--quiet", "--seed", "3", "--target", target,
            "--checkpoint", str(ck), "--log", str(tmp_path / f"{target}.jsonl")]  # fmt: skip
    assert main(args) == 0
    return dict(np.load(ck))


ADDING = [os.path.join(ROOT, "specs", "adding_lstm.rnn"), "--task", "adding", "--dim", "H=8",
          "--seq-len", "6", "--batch", "4", "--steps", "12"]  # fmt: skip


@needs_gxx
@pytest.mark.parametrize("recompute", [False, True])
def test_torch_module_on_the_cupy_target_equals_numpy(stand_in_cupy, recompute):
    """rnnc.torch.Module(target="cupy"): parameters, inputs and gradients cross by DLPack
    (no copies), the forward and backward passes are the CuPy target's (here its stand-in,
    kernels as host C++); equal to the NumPy target in train and eval mode, with lengths and
    initial states. On a GPU a CUDA tensor picks this target by itself."""
    torch = pytest.importorskip("torch")
    import rnnc.torch as rt

    spec = """cell LN(x[I]) -> h[H] {
  param W[H, I], U[H, H], g[H] = 1
  a = layernorm(W @ x + U @ dropout(h[t-1], 0.3, per=sequence))
  h = zoneout(tanh(g * a + sum(x) / H), 0.2)
}

model m {
  dim I = 3, H = 4
  input x[I] : sequence
  h = LN(x, H=H)
}
"""
    mods = [rt.Module(spec, dtype=torch.float64, recompute=recompute, target=t, seed=5)
            for t in ("numpy", "cupy")]  # fmt: skip
    x = torch.randn(6, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h0 = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(6, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for train in (True, False):
        got = []
        for m in mods:
            m.train(train)
            xs, h0s = x.clone().requires_grad_(), h0.clone().requires_grad_()
            y = m(xs, lengths=np.array([6, 2, 5]), init={"h.h.init": h0s})
            (y * w).sum().backward()
            got.append([y.detach(), xs.grad, h0s.grad, *(p.grad.clone() for p in m.params_)])
            m.zero_grad()
        for a, b in zip(*got, strict=True):
            assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max()), train
    assert any(k.launches for k in stand_in_cupy.counts.values())
    assert set(mods[1].compiled) == {"numpy", "cupy"}
    with pytest.raises(RnncError, match="unknown target"):
        rt.Module(spec, target="jax")


@needs_gxx
def test_training_on_the_cupy_target_follows_numpy(tmp_path, stand_in_cupy):
    host = train(tmp_path, "numpy", *ADDING)
    dev = train(tmp_path, "cupy", *ADDING)
    assert sum(k.launches for k in stand_in_cupy.counts.values()) > 12 * 6  # kernels ran
    weights = [k for k in host if k.startswith(("param/", "opt.m/", "opt.v/"))]
    assert weights and set(weights) == {k for k in dev if k != "meta"}
    for k in weights:
        assert rel(dev[k], host[k]) < 1e-9, k

    def losses(target: str) -> list[float]:
        rows = (tmp_path / f"{target}.jsonl").read_text().splitlines()
        return [json.loads(row)["loss"] for row in rows[1:]]  # row 0: before training

    assert len(losses("cupy")) == 12
    assert np.allclose(losses("cupy"), losses("numpy"), rtol=1e-10, atol=0)


@needs_gxx
def test_resume_on_the_cupy_target_is_exact(tmp_path, stand_in_cupy):
    whole = train(tmp_path, "cupy", *ADDING)
    half = [*ADDING[:-1], "6"]
    (tmp_path / "cupy.npz").unlink()
    train(tmp_path, "cupy", *half)
    resumed = train(tmp_path, "cupy", *ADDING, "--resume")
    for k in whole:
        if k != "meta":
            assert np.array_equal(resumed[k], whole[k]), k


@needs_gxx
def test_truncated_bptt_and_generation_on_the_cupy_target(tmp_path, stand_in_cupy, capsys):
    from rnnc.cli import main

    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    spec = os.path.join(ROOT, "specs", "generator.rnn")  # has a `generate` rule
    text = [spec, "--task", "text", "--text", str(tmp_path / "t.txt"), "--dim", "H=8",
            "--seq-len", "8", "--batch", "4", "--steps", "5"]  # fmt: skip
    host, dev = train(tmp_path, "numpy", *text), train(tmp_path, "cupy", *text)
    assert [k for k in host if k.startswith("carry/")]  # the state carried between windows
    for k in host:
        if k != "meta":
            assert rel(dev[k], host[k]) < 1e-9, k
    capsys.readouterr()
    said = {}
    for target in ("numpy", "cupy"):
        ck = str(tmp_path / f"{target}.npz")
        assert main(["run", spec, "--generate", "40", "--checkpoint", ck, "--prime", "the ",
                     "--dim", "H=8", "--seed", "1", "--target", target]) == 0  # fmt: skip
        said[target] = capsys.readouterr().out
    assert said["cupy"] == said["numpy"] and len(said["cupy"].rstrip("\n")) == 44


@needs_gxx
def test_run_target_cupy_writes_the_numpy_targets_outputs(tmp_path, stand_in_cupy):
    from rnnc.cli import main

    spec = os.path.join(ROOT, "specs", "tagger.rnn")
    mn = compile_spec(spec, dims=small_dims(spec))
    _Ts, _, inputs, targets, L = random_data(mn.graph, 5, 3, seed=8, lengths=True)
    lengths = {f"{k}.lengths": v for k, v in (L or {}).items()}
    np.savez(tmp_path / "d.npz", **inputs, **targets, **lengths)
    dims = [x for k, v in small_dims(spec).items() for x in ("--dim", f"{k}={v}")]
    outs = {}
    for target in ("numpy", "cupy"):
        out = tmp_path / f"{target}.npz"
        assert main(["run", spec, "--data", str(tmp_path / "d.npz"), "--float64", "--target",
                     target, "-o", str(out), *dims]) == 0  # fmt: skip
        outs[target] = dict(np.load(out))
    assert set(outs["cupy"]) == set(outs["numpy"]) and "loss" in outs["cupy"]
    for k, v in outs["numpy"].items():
        assert rel(outs["cupy"][k], v) < 1e-10, k


@needs_gxx
def test_bench_times_the_cupy_target(stand_in_cupy, capsys):
    from rnnc.cli import main

    spec = os.path.join(ROOT, "specs", "gru.rnn")
    assert main(["bench", spec, "--target", "cupy", "--steps", "4", "--batch", "2",
                 "--repeat", "2", "--dim", "H=8"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("T=4, B=2, median of 2")
    rows = {line[:28].strip(): line[28:].split() for line in out[1:]}
    assert set(rows) == {"forward (evaluation)", "forward+backward (training)"}
    assert all(v[0] == "char_gru" and float(v[1]) > 0 and v[2] == "us/step" for v in rows.values())
    assert stand_in_cupy.counts  # its kernels ran


# ----- the command line -----


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnnc.cli_entry", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})})  # fmt: skip


def test_compile_target_cupy_writes_code_on_any_machine(tmp_path):
    out = tmp_path / "model.py"
    r = run_cli("compile", "specs/gru.rnn", "--target", "cupy", "-o", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "import cupy as cp" in text and "cp.RawKernel" in text and "KERNELS = {" in text


def without_cupy() -> dict:
    """An environment where `import cupy` fails, whatever this machine has installed."""
    shim = tempfile.mkdtemp(prefix="rnnc-nocupy-")
    with open(os.path.join(shim, "cupy.py"), "w") as f:
        f.write("raise ImportError('No module named cupy')\n")
    return {"PYTHONPATH": shim + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_run_target_cupy_without_cupy_says_so_and_exits_1():
    r = run_cli("run", "specs/gru.rnn", "--target", "cupy", env=without_cupy())
    assert r.returncode == 1
    assert "needs CuPy, which is not installed" in r.stderr
    assert "pip install 'rnnc[cupy]'" in r.stderr and "Traceback" not in r.stderr


def test_no_driver_no_device_and_no_toolkit_are_told_apart(monkeypatch):
    import types

    from rnnc.compiler import require_gpu

    def fake(count, nvrtc_version=lambda: (12, 9)):
        rt = types.SimpleNamespace(getDeviceCount=count)
        nvrtc = types.SimpleNamespace(getVersion=nvrtc_version)
        return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=rt, nvrtc=nvrtc, cublas=1))

    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    def no_nvrtc():  # what CuPy 13 says without a CUDA toolkit
        raise RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: "
                           "cannot open shared object file: No such file or directory")  # fmt: skip

    monkeypatch.setitem(sys.modules, "cupy", fake(no_driver))
    with pytest.raises(RnncError, match="no usable CUDA driver"):
        require_gpu()
    monkeypatch.setitem(sys.modules, "cupy", fake(lambda: 0))
    with pytest.raises(RnncError, match="found no GPU"):
        require_gpu()
    monkeypatch.setitem(sys.modules, "cupy", fake(lambda: 1, no_nvrtc))
    with pytest.raises(RnncError, match="needs CUDA's NVRTC library") as e:
        require_gpu()
    assert "nvidia-cuda-nvrtc-cu12" in e.value.hint
    monkeypatch.setitem(sys.modules, "cupy", fake(lambda: 1))
    require_gpu()


# ----- on a GPU -----


def real_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not real_gpu(), reason="no GPU")
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_on_the_gpu_cupy_equals_numpy(spec, dtype, tol):
    dims = small_dims(spec)
    mn = compile_spec(spec, dims=dims)
    mc = compile_spec(spec, dims=dims, target="cupy")
    _Ts, params, inputs, targets, L = random_data(mn.graph, 6, 3, seed=7, lengths=True)
    params = {k: v.astype(dtype) for k, v in params.items()}
    inputs = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in inputs.items()}
    loss, grads = mn.loss_and_grads(params, inputs, targets, lengths=L)
    loss_c, grads_c = mc.loss_and_grads(params, inputs, targets, lengths=L)
    assert abs(loss_c - loss) <= tol * abs(loss)
    for k in grads:
        assert rel(grads_c[k].get(), grads[k]) < tol, k


@pytest.mark.gpu
@pytest.mark.skipif(not real_gpu(), reason="no GPU")
@settings(max_examples=30)
@given(cells())
def test_on_the_gpu_random_cells(case):

    same_as_numpy_for_a_random_cell(case, lambda text: compile_spec(text, target="cupy"))


@pytest.mark.gpu
@pytest.mark.skipif(not real_gpu(), reason="no GPU")
def test_on_the_gpu_training_follows_numpy(tmp_path):
    host = train(tmp_path, "numpy", *ADDING)
    dev = train(tmp_path, "cupy", *ADDING)
    for k in host:
        if k != "meta":
            assert rel(dev[k], host[k]) < 1e-9, k


@pytest.mark.gpu
@pytest.mark.skipif(not real_gpu(), reason="no GPU")
def test_on_the_gpu_torch_module_takes_cuda_tensors():
    """A CUDA tensor picks the CuPy target; tensors cross by DLPack; equal to the CPU run."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch was built without CUDA")
    import rnnc.torch as rt

    spec = os.path.join(ROOT, "specs", "ln_lstm.rnn")
    cpu = rt.Module(spec, dims=small_dims(spec), dtype=torch.float64).eval()
    gpu = rt.Module(spec, dims=small_dims(spec), dtype=torch.float64).eval().cuda()
    with torch.no_grad():
        for a, b in zip(cpu.params_, gpu.params_, strict=True):
            b.copy_(a)
    x = torch.randn(7, 3, cpu.fwd.inputs["x"][0][0], dtype=torch.float64)
    got = []
    for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
        xs = x.to(dev).requires_grad_()
        y = m(xs, lengths=np.array([7, 3, 5]))
        assert y.device.type == dev
        y.square().sum().backward()
        got.append([y.detach().cpu(), xs.grad.cpu(), *(p.grad.cpu() for p in m.params_)])
    assert set(gpu.compiled) == {"numpy", "cupy"}
    for a, b in zip(*got, strict=True):
        assert float((a - b).abs().max()) <= 1e-10 * float(b.abs().max())
