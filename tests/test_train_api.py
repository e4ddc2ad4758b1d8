"""Training as a library (issue 16): the optimizers equal torch.optim's update for update in
float64; a user's own loop (an iterator of batches, AdamW, a callback that evaluates and
stops) takes ten lines; the Trainer's checkpoints resume exactly through the API too."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import rnnc
from rnnc import train

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")


@pytest.mark.parametrize("make,reference", [
    (lambda: train.Adam(lr=0.01), lambda p: __import__("torch").optim.Adam(p, lr=0.01)),
    (lambda: train.Adam(lr=0.01, weight_decay=0.1),
     lambda p: __import__("torch").optim.AdamW(p, lr=0.01, weight_decay=0.1)),
    (lambda: train.SGD(lr=0.05, momentum=0.8, weight_decay=0.01),
     lambda p: __import__("torch").optim.SGD(p, lr=0.05, momentum=0.8, weight_decay=0.01)),
])  # fmt: skip
def test_optimizers_equal_torch_optim(make, reference):
    torch = pytest.importorskip("torch", reason="the oracle is torch.optim")
    rng = np.random.default_rng(0)
    params = {"W": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    s = train.State({k: v.copy() for k, v in params.items()},
                    {k: np.zeros_like(v) for k, v in params.items()},
                    {k: np.zeros_like(v) for k, v in params.items()})  # fmt: skip
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt, ref = make(), reference(list(tp.values()))
    for _ in range(6):
        grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
        opt.update(s, grads, opt.lr)
        for k, t in tp.items():
            t.grad = torch.tensor(grads[k])
        ref.step()
    for k in params:
        assert np.abs(s.params[k] - tp[k].detach().numpy()).max() <= 1e-13, k


def adding_batches(rng, n: int, B: int = 16, T: int = 10):
    """A user's own data: an endless supply of adding-problem batches, as a generator."""
    from rnnc.tasks import adding_batch

    for _ in range(n):
        yield adding_batch(rng, T, B)


def test_a_users_loop_in_ten_lines(tmp_path):
    seen = []

    def evaluate(trainer, record):  # a callback: evaluate on the side, stop early
        seen.append(record.step)
        trainer.stop = record.step >= 120

    m = rnnc.compile(os.path.join(SPECS, "adding_lstm.rnn"), dims={"H": 16})
    data = train.Batches(adding_batches(np.random.default_rng(0), 10**6))
    t = train.Trainer(m, data, train.Adam(lr=1e-2, weight_decay=1e-4), steps=1000, clip=1.0,
                      callbacks=[evaluate], log=str(tmp_path / "m.jsonl"), validate_every=20)
    history = t.fit()
    assert seen == list(range(1, 121)) and t.s.step == 120
    vals = [r.val_loss for r in history if r.val_loss is not None]
    assert vals[-1] < 0.5 * vals[0]
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 120 and {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(rows[-1])


def test_arrays_and_checkpoints_through_the_api(tmp_path):
    m = rnnc.compile(os.path.join(SPECS, "many_to_one.rnn"), dims={"H": 8})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 30, 8))
    label = (x[:, :, 0].sum(0) > 0).astype(np.int64)
    ck = str(tmp_path / "ck.npz")

    def run(steps, resume=False):
        data = train.Arrays(m, {"x": x}, {"label": label}, batch=10, dtype=np.float64)
        t = train.Trainer(m, data, train.SGD(lr=0.05), steps=steps, dtype=np.float64,
                          checkpoint=ck, checkpoint_every=5, resume=resume)  # fmt: skip
        t.fit()
        return t.params

    whole = run(20)
    os.remove(ck)
    run(10)
    resumed = run(20, resume=True)
    assert all(np.array_equal(whole[k], resumed[k]) for k in whole)


def test_a_data_source_that_does_not_fit_is_named():
    m = rnnc.compile(os.path.join(SPECS, "elman.rnn"), dims={"H": 4})
    with pytest.raises(rnnc.RnncError, match="this spec does not fit the adding task"):
        train.Trainer(m, train.Task("adding", 4, 5), steps=1)
    with pytest.raises(rnnc.RnncError, match="the batches ran out before the last step"):
        data = train.Batches(iter([({"x": np.zeros((5, 2, 27))}, {"y": np.zeros((5, 2), int)}, None)]))
        train.Trainer(m, data, steps=3).fit()
