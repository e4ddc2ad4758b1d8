"""PyTorch weights in and out (issue 15, item 1): torch.nn.RNN/LSTM/GRU of any depth,
direction, proj_size and bias <-> the library cells' params, each conversion checked by
running both in float64 (outputs to 1e-12); the command line `rnnc convert`."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import PERMUTED_LSTM

torch = pytest.importorskip("torch", reason="PyTorch interop needs torch (pip install '.[test]')")

from rnnc import interop  # noqa: E402
from rnnc.cli import main  # noqa: E402
from rnnc.compiler import compile_spec  # noqa: E402
from rnnc.errors import RnncError  # noqa: E402
from rnnc.files import load_arrays  # noqa: E402

nn = torch.nn
MODULES = {
    "lstm": lambda: nn.LSTM(3, 5),
    "lstm-2-bi": lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True),
    "lstm-proj": lambda: nn.LSTM(3, 5, num_layers=2, proj_size=2),
    "lstm-nobias": lambda: nn.LSTM(3, 5, bias=False, bidirectional=True),
    "gru-3": lambda: nn.GRU(4, 3, num_layers=3),
    "gru-bi": lambda: nn.GRU(4, 3, bidirectional=True),
    "rnn-tanh": lambda: nn.RNN(2, 6),
    "rnn-relu-2-bi": lambda: nn.RNN(2, 6, num_layers=2, nonlinearity="relu", bidirectional=True),
}


@pytest.mark.parametrize("name", MODULES)
def test_torch_modules_round_trip_exactly(name):
    torch.manual_seed(0)
    mod = MODULES[name]()
    model, params, report = interop.from_torch(mod)
    assert "outputs agree to" in report
    assert float(report.split("agree to ")[1].split()[0]) <= 1e-12
    sd = mod.state_dict()
    for tname, rname in interop.mapping(model, "h", interop.config_of(interop.as_numpy(sd))).items():
        if tname in sd:
            assert np.array_equal(params[rname], sd[tname].double().numpy()), tname
        else:  # bias=False: rnnc's biases are zero
            assert not params[rname].any()
    back = interop.to_torch(model, params, bias=mod.bias)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v.double()), k
    # the float32 module gives the same outputs as rnnc in float32, to float32 round-off
    x = np.random.default_rng(1).normal(size=(6, 2, mod.input_size)).astype(np.float32)
    with torch.no_grad():
        want = mod(torch.tensor(x))[0].numpy()
    got = model.forward({k: v.astype(np.float32) for k, v in params.items()}, {"x": x})["h"]
    assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1)


def user_spec(cell_body: str | None = None) -> str:
    cell = cell_body or "use LSTM\n"
    return cell + """
model tagger {
  dim I = 3, H = 5, K = 2
  input x[I] : sequence
  h = LSTM(x, H=H)
}
"""


def test_a_users_spec_that_holds_the_weights():
    torch.manual_seed(1)
    mod = nn.LSTM(3, 5)
    _, params, _ = interop.from_torch(mod, model=compile_spec(user_spec()))
    assert np.array_equal(params["h.weight_hh"], mod.weight_hh_l0.double().detach().numpy())


def test_a_spec_that_cannot_hold_the_module_says_which_tensor():
    with pytest.raises(RnncError, match=r"param 'h.weight_ih' is \[20, 3\]; torch's 'weight_ih_l0' is \[20, 4\]"):
        interop.from_torch(nn.LSTM(4, 5), model=compile_spec(user_spec()))
    with pytest.raises(RnncError, match="'h' has 1 layer"):
        interop.from_torch(nn.LSTM(3, 5, num_layers=2), model=compile_spec(user_spec()))
    with pytest.raises(RnncError, match="no cell instance 'enc'"):
        interop.from_torch(nn.LSTM(3, 5), model=compile_spec(user_spec()), instance="enc")


def test_a_cell_that_computes_something_else_is_caught_by_the_check():
    with pytest.raises(RnncError, match=r"outputs differ by .* \(relative; the limit is 1e-12\)"):
        interop.from_torch(nn.LSTM(3, 5), model=compile_spec(user_spec(PERMUTED_LSTM)))


def test_to_a_bias_free_module_refuses_nonzero_biases():
    model, params, _ = interop.from_torch(nn.LSTM(3, 5))
    with pytest.raises(RnncError, match=r"param 'h\.bias_ih' is not zero, and a bias=False module has no 'bias_ih_l0'"):
        interop.to_torch(model, params, bias=False)


def test_state_dicts_that_are_not_recurrent_modules_are_refused():
    with pytest.raises(RnncError, match=r"'weight' is not a parameter of torch\.nn\.RNN, LSTM or GRU"):
        interop.from_torch(nn.Linear(3, 4))
    sd = nn.LSTM(3, 5, num_layers=2).state_dict()
    del sd["bias_hh_l1"]
    with pytest.raises(RnncError, match="lacks 'bias_hh_l1'"):
        interop.from_torch(sd)


def test_convert_on_the_command_line_both_ways(tmp_path, capsys):
    torch.manual_seed(2)
    mod = nn.GRU(3, 4, num_layers=2, bidirectional=True)
    pt, params, spec, back = (str(tmp_path / n) for n in ("m.pt", "p.safetensors", "m.rnn", "back.pt"))
    torch.save(mod.state_dict(), pt)
    assert main(["convert", pt, "-o", params, "--spec-out", spec]) == 0
    assert "outputs agree to" in capsys.readouterr().out
    assert set(load_arrays(params)) == {f"param/{k}" for k in compile_spec(spec).params}
    assert main(["convert", params, "--spec", spec, "-o", back]) == 0
    got = torch.load(back, weights_only=True)
    assert all(torch.equal(got[k], v.double()) for k, v in mod.state_dict().items())
    # the converted params run under `rnnc run` and give the module's outputs
    x = np.random.default_rng(3).normal(size=(5, 2, 3))
    np.savez(tmp_path / "d.npz", x=x)
    assert main(["run", spec, "--data", str(tmp_path / "d.npz"), "--params", params, "--float64",
                 "-o", str(tmp_path / "out.npz")]) == 0  # fmt: skip
    with torch.no_grad():
        want = mod.double()(torch.tensor(x))[0].numpy()
    assert np.abs(np.load(tmp_path / "out.npz")["h"] - want).max() < 1e-12


def test_convert_refuses_pickles_and_misuse(tmp_path, capsys):
    whole = str(tmp_path / "whole.pt")
    torch.save(nn.LSTM(3, 4), whole)
    assert main(["convert", whole, "-o", str(tmp_path / "p.npz")]) == 1
    err = capsys.readouterr().err
    assert "not a torch file of weights only (it holds Python objects beyond tensors" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)))
    assert main(["convert", str(junk), "-o", str(tmp_path / "p.npz")]) == 1
    assert "is damaged or not a torch.save file" in capsys.readouterr().err
    assert main(["convert", whole, "-o", str(tmp_path / "p.txt")]) == 2
    assert "convert reads and writes .pt (torch), .npz or .safetensors files" in capsys.readouterr().err
    assert main(["convert", whole, "-o", str(tmp_path / "p.pt")]) == 2
    assert main(["convert", str(tmp_path / "p.npz"), "-o", str(tmp_path / "q.pt")]) == 2  # no --spec
    assert "needs --spec SPEC" in capsys.readouterr().err
