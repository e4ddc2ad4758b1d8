"""Data-parallel training on MPI (issue 16): N processes, each on its shard of every batch,
equal one process on the whole batch (parameters after 50 steps in float64 to 1e-12, N = 1,
2, 3 with uneven shards); --resume works with another N; a process that fails ends the job
with a message instead of a hang. Runs under `mpiexec`; skips with the reason where MPI or
mpi4py is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rnnc.cli import main
from rnnc.files import load_npz

try:
    import mpi4py  # noqa: F401
except ImportError:
    pytest.skip("mpi4py is not installed (pip install 'rnnc[mpi]')", allow_module_level=True)
MPIEXEC = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
if not os.path.exists(MPIEXEC):
    pytest.skip("no mpiexec (the mpich wheel or an MPI installation)", allow_module_level=True)

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def args(spec: str, task: str, *extra: str) -> list[str]:
    return ["run", os.path.join(SPECS, spec), "--train", "--task", task, "--float64", "--quiet",
            "--dim", "H=8", "--seq-len", "6", "--batch", "7", "--seed", "1", *extra]  # fmt: skip


def on_ranks(n: int, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, "-m", "rnnc.cli_entry", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip


def params(path) -> dict[str, np.ndarray]:
    return {k: v for k, v in load_npz(str(path)).items() if k.startswith("param/")}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-300)) for k in a)


@pytest.mark.parametrize("spec,task", [("adding_rnn.rnn", "adding"), ("gru.rnn", "text"),
                                       ("lstm_dropout.rnn", "text")])  # masks drawn for the whole batch
def test_n_processes_equal_one_on_the_whole_batch(tmp_path, spec, task):
    (tmp_path / "t.txt").write_text(TEXT)
    base = args(spec, task, "--steps", "50", "--text", str(tmp_path / "t.txt"))
    assert main([*base, "-o", str(tmp_path / "p1.npz")]) == 0
    one = params(tmp_path / "p1.npz")
    for n in (2, 3):  # 7 sequences: shards of 4+3 and 2+3+2
        r = on_ranks(n, [*base, "-o", str(tmp_path / f"p{n}.npz")])
        assert r.returncode == 0, r.stderr
        assert f"on {n} processes" in r.stdout and r.stdout.count("trained") == 1  # rank 0 alone
        assert largest_difference(params(tmp_path / f"p{n}.npz"), one) <= 1e-12


def test_resume_with_another_number_of_processes(tmp_path):
    ck, ref = tmp_path / "ck.npz", tmp_path / "ref.npz"
    base = args("adding_rnn.rnn", "adding")
    assert main([*base, "--steps", "40", "--checkpoint", str(ref)]) == 0
    r = on_ranks(2, [*base, "--steps", "20", "--checkpoint", str(ck)])
    assert r.returncode == 0, r.stderr
    r = on_ranks(3, [*base, "--steps", "40", "--checkpoint", str(ck), "--resume"])
    assert r.returncode == 0, r.stderr
    assert largest_difference(params(ck), params(ref)) <= 1e-12
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_a_failing_process_ends_the_job_with_a_message(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np
        import rnnc
        from rnnc import train
        from rnnc.parallel import world
        comm = world()
        m = rnnc.compile({os.path.join(SPECS, "adding_rnn.rnn")!r}, dims={{"H": 4}})
        def fail_on_rank_1(t, record):
            if comm.rank == 1 and record.step == 3:
                raise RuntimeError("disk on fire")
        train.Trainer(m, train.Task("adding", 8, 5), train.Adam(1e-2), steps=10**6,
                      callbacks=[fail_on_rank_1], comm=comm).fit()
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script)], capture_output=True,
                       text=True, timeout=120, env=env)  # fmt: skip
    assert r.returncode != 0
    assert "process 1 of 2 failed (RuntimeError: disk on fire); stopping all of them" in r.stderr


def test_a_batch_smaller_than_the_processes_is_refused(tmp_path):
    r = on_ranks(3, args("adding_rnn.rnn", "adding", "--steps", "2", "--batch", "2"))
    assert r.returncode == 1 and "a batch of 2 cannot be shared by 3 processes" in r.stderr
