"""A .rnn model as a torch.nn.Module (issue 15, item 2): torch.autograd.gradcheck in float64,
equal to torch.nn.LSTM with the same weights (outputs, parameter, input and initial-state
gradients; variable lengths), and training inside an ordinary PyTorch loop."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="rnnc.torch needs torch (pip install '.[test]')")

import rnnc.torch as rt  # noqa: E402
from rnnc.errors import RnncError  # noqa: E402

LSTM_SPEC = "use LSTM\n\nmodel m {\n  dim I = 3, H = 5\n  input x[I] : sequence\n  h = LSTM(x, H=H)\n}\n"
CUSTOM = """cell LN(x[I]) -> h[H] {
  param W[H, I], U[H, H], g[H] = 1
  a = layernorm(W @ x + U @ h[t-1])
  h = zoneout(tanh(g * a + sum(x) / H), 0.2)
}

model m {
  dim I = 3, H = 4
  input x[I] : sequence
  target y[H] : sequence
  h = LN(x, H=H)
  loss = mse(h, y)
}
"""


def copy_from(cell: rt.Module, ref) -> None:
    with torch.no_grad():
        for name, p in cell.named_rnnc_parameters().items():
            p.copy_(getattr(ref, name.split(".")[1] + "_l0"))


def native_if(target):
    if target == "native":
        pytest.importorskip("numba", reason="the native target needs numba (pip install numba)")


def test_cpu_tensors_run_on_the_default_target(monkeypatch):
    """target=None: CPU tensors take rnnc's default target (native where numba imports, or
    $RNNC_TARGET), as rnnc.compile does; the tests' own setting is the NumPy target."""
    cell = rt.Module(LSTM_SPEC)
    x = torch.zeros(2, 1, 3)
    assert cell.target_for(x) == "numpy"  # RNNC_TARGET=numpy (conftest.py)
    monkeypatch.delenv("RNNC_TARGET")
    native_if("native")
    assert cell.target_for(x) == "native"
    assert rt.Module(LSTM_SPEC, target="numpy").target_for(x) == "numpy"


@pytest.mark.parametrize("target", [None, "native"])
@pytest.mark.parametrize("spec", [LSTM_SPEC, CUSTOM], ids=["library-lstm", "custom-cell"])
def test_torch_gradcheck_in_float64(spec, target):
    native_if(target)
    torch.manual_seed(0)
    cell = rt.Module(spec, dtype=torch.float64, target=target).eval()  # zoneout at its expectation
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4 if spec == CUSTOM else 5, dtype=torch.float64, requires_grad=True)
    L = np.array([5, 3])
    assert torch.autograd.gradcheck(lambda x, h0, *p: cell(x, lengths=L, init={"h.h.init": h0}),
                                    (x, h0, *cell.params_), eps=1e-6, atol=1e-8, rtol=1e-6)  # fmt: skip
    if target == "native":  # the VJP's loops ran compiled
        ran = cell.models("native")[1].module.NATIVE
        assert ran and all(ran.values()), ran


@pytest.mark.parametrize("target", [None, "native"])
def test_equals_torch_lstm_with_the_same_weights(target):
    native_if(target)
    torch.manual_seed(1)
    cell = rt.Module(LSTM_SPEC, dtype=torch.float64, target=target)
    ref = torch.nn.LSTM(3, 5, dtype=torch.float64)
    copy_from(cell, ref)
    x = torch.randn(7, 4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = cell(x, init={"h.h.init": h0, "h.c.init": c0})
    w = torch.randn_like(y)
    (y * w).sum().backward()
    mine = [x.grad.clone(), h0.grad.clone(), c0.grad.clone(), *(p.grad.clone() for p in cell.params_)]
    for t in (x, h0, c0):
        t.grad = None
    y2, _ = ref(x, (h0[None], c0[None]))
    (y2 * w).sum().backward()
    theirs = [x.grad, h0.grad, c0.grad, *(getattr(ref, n.split(".")[1] + "_l0").grad for n in cell.names)]
    assert float((y - y2).abs().max() / y2.abs().max()) < 1e-12
    for a, b in zip(mine, theirs, strict=True):
        assert float((a - b).norm() / b.norm()) < 1e-10


def test_trains_in_a_pytorch_loop_like_nn_lstm():
    """Adam from torch.optim on both, 20 steps in float64: the same parameters after."""
    torch.manual_seed(2)
    cell = rt.Module(LSTM_SPEC, dtype=torch.float64)
    ref = torch.nn.LSTM(3, 5, dtype=torch.float64)
    copy_from(cell, ref)
    head_a, head_b = torch.nn.Linear(5, 1, dtype=torch.float64), torch.nn.Linear(5, 1, dtype=torch.float64)
    head_b.load_state_dict(head_a.state_dict())
    opt_a = torch.optim.Adam([*cell.parameters(), *head_a.parameters()], lr=1e-2)
    opt_b = torch.optim.Adam([*ref.parameters(), *head_b.parameters()], lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(20):
        x = torch.randn(6, 8, 3, dtype=torch.float64, generator=gen)
        target = x.sum(dim=(0, 2))[:, None]
        for model, head, opt in ((cell, head_a, opt_a), (lambda x: ref(x)[0], head_b, opt_b)):
            opt.zero_grad()
            loss = ((head(model(x)[-1]) - target) ** 2).mean()
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in cell.named_rnnc_parameters().items():
        q = getattr(ref, name.split(".")[1] + "_l0")
        assert float((p - q).abs().max()) < 1e-10, name


def test_a_model_with_two_inputs_or_no_such_output_is_refused():
    with pytest.raises(RnncError, match="no output 'z'"):
        rt.Module(LSTM_SPEC, output="z")
    two = LSTM_SPEC.replace("  input x[I] : sequence\n", "  input x[I] : sequence\n  input q[I] : sequence like x\n") \
        .replace("LSTM(x, H=H)", "LSTM(x + q, H=H)")  # fmt: skip
    with pytest.raises(RnncError, match="one input sequence"):
        rt.Module(two)


def test_train_mode_draws_masks_and_eval_mode_does_not():
    torch.manual_seed(4)
    cell = rt.Module(CUSTOM, dtype=torch.float64, seed=5)
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    cell.eval()
    a, b = cell(x), cell(x)
    assert torch.equal(a, b)
    cell.train()
    c = cell(x)
    assert not torch.equal(a, c)
    # the backward pass uses the forward's masks: gradcheck holds with the generator reset
    def f(x, *p):
        cell.rng = np.random.default_rng(9)
        return cell(x)
    assert torch.autograd.gradcheck(f, (x, *cell.params_), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_the_backward_pass_does_not_run_the_forward_pass_again(monkeypatch):
    """With a gradient wanted, forward runs the vjp generator and backward only resumes it;
    under no_grad the plain forward pass runs. Gradients equal recompute=True's, and an
    in-place change of the output does not reach the tape (the output is a copy)."""
    torch.manual_seed(2)
    cells = [rt.Module(CUSTOM, dtype=torch.float64, recompute=r).eval() for r in (False, True)]
    with torch.no_grad():
        for a, b in zip(*(c.params_ for c in cells), strict=True):
            b.copy_(a)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    w = torch.randn(6, 3, 4, dtype=torch.float64)
    grads = []
    for cell in cells:
        if not cell.recompute:
            def refuse(*a, **k):
                raise AssertionError("the forward pass ran again")

            monkeypatch.setattr(cell.bwd.module, "loss_and_all_grads", refuse)
            monkeypatch.setattr(cell.fwd.module, "forward", refuse)
        y = cell(x, lengths=np.array([6, 2, 4]))
        y.add_(1.0)  # the gradient of an in-place add is the identity
        (y * w).sum().backward()
        grads.append([p.grad.clone() for p in cell.params_])
        monkeypatch.undo()
    for a, b in zip(*grads, strict=True):
        assert float((a - b).abs().max()) <= 1e-14 * float(b.abs().max())
    taped = cells[0]
    monkeypatch.setattr(taped.bwd.module, "vjp", lambda *a, **k: pytest.fail("a tape under no_grad"))
    with torch.no_grad():
        assert taped(x).shape == (6, 3, 4)


def test_a_second_backward_pass_with_retain_graph():
    torch.manual_seed(3)
    cell = rt.Module(LSTM_SPEC, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    y = cell(x)
    y.sum().backward(retain_graph=True)
    once = x.grad.clone()
    y.sum().backward()  # the tape is spent: this one runs the forward pass again
    assert float((x.grad - 2 * once).abs().max()) < 1e-14


def test_windows_in_the_backward_pass_remat(monkeypatch):
    """Module(remat=K): the backward pass recomputes in windows of K steps (rnnc.remat).
    gradcheck passes (lengths, an initial state), and in train() mode, with the same masks
    drawn, its gradients equal the taped module's; a cell that cannot be cut is refused."""
    torch.manual_seed(4)
    cell = rt.Module(CUSTOM, dtype=torch.float64, remat=2).eval()
    x = torch.randn(7, 3, 3, dtype=torch.float64, requires_grad=True)
    bwd = cell.models(cell.target_for(x))[1]  # the VJP's model of the target x runs on
    windows, plain = [], bwd.module.loss_and_grads
    monkeypatch.setattr(bwd.module, "loss_and_grads",
                        lambda *a, **k: windows.append(k.get("window")) or plain(*a, **k))  # fmt: skip
    h0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    L = np.array([7, 1, 4])
    assert torch.autograd.gradcheck(lambda x, h0, *p: cell(x, lengths=L, init={"h.h.init": h0}),
                                    (x, h0, *cell.params_), eps=1e-6, atol=1e-8, rtol=1e-6)  # fmt: skip
    assert windows and all(w is not None for w in windows)  # 4 windows a backward pass
    taped = rt.Module(CUSTOM, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(cell.params_, taped.params_, strict=True):
            b.copy_(a)
    grads = []
    for c in (cell.train(), taped.train()):
        c.rng = np.random.default_rng(5)
        c.zero_grad()
        (c(x, lengths=L) ** 2).sum().backward()
        grads.append([p.grad.clone() for p in c.params_])
    for a, b in zip(*grads, strict=True):
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())
    with pytest.raises(RnncError, match="cannot checkpoint over time"):
        rt.Module(LSTM_SPEC.replace("h = LSTM", "h = bidirectional LSTM"), remat=2)
