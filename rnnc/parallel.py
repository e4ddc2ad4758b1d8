"""Data-parallel training over MPI: each rank computes the loss and gradients of its shard of
every batch, one Allreduce of one flat buffer sums them (with the loss and a stop flag), and
every rank applies the same update. `Single` is the same interface for one process."""

from __future__ import annotations

import os
import time

import numpy as np

from .errors import RnncError
from .files import on_host

# set by the launchers: MPICH/Hydra (PMI_SIZE), Open MPI, Slurm's srun with PMI
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")


class Single:
    """One process: nothing to sum, nothing to gather."""

    rank, size = 0, 1
    seconds = 0.0

    def sum_grads(self, grads: dict, loss: float, stop: float) -> tuple[float, bool]:
        return loss, bool(stop)

    def gather_rows(self, carry: dict, batch: int) -> dict:
        return carry

    def abort(self, code: int) -> None:
        pass


class Mpi:
    """An mpi4py communicator as the trainer uses it."""

    def __init__(self, comm):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self.seconds = 0.0  # spent in the all-reduce (waiting for the slowest rank included)

    def sum_grads(self, grads: dict, loss: float, stop: float) -> tuple[float, bool]:
        """grads summed over the ranks in place (one Allreduce: every gradient, then the loss
        and the stop flag, in one flat buffer); (the summed loss, whether any rank stops)."""
        from mpi4py import MPI

        keys = sorted(grads)
        host = {k: on_host(grads[k]) for k in keys}
        dtype = np.result_type(*(v.dtype for v in host.values()))
        flat = np.concatenate([*(host[k].ravel().astype(dtype) for k in keys),
                               np.array([loss, stop], dtype)])  # fmt: skip
        t0 = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        self.seconds += time.perf_counter() - t0
        at = 0
        for k in keys:
            n = host[k].size
            part = flat[at : at + n].reshape(host[k].shape)
            grads[k] = part if isinstance(grads[k], np.ndarray) else on_device(part)
            at += n
        return float(flat[-2]), bool(flat[-1])

    def gather_rows(self, carry: dict, batch: int) -> dict:
        """Each rank's rows of the carried state, joined in rank order: the whole batch's."""
        parts = self.comm.allgather({k: on_host(v) for k, v in carry.items()})
        return {k: np.concatenate([p[k] for p in parts], axis=1) for k in carry}

    def abort(self, code: int) -> None:
        """End every rank now (a rank that fails must not leave the others waiting)."""
        self.comm.Abort(code)


def on_device(a: np.ndarray):
    """A host array back on the GPU (a CUDA-aware MPI would sum device buffers directly)."""
    import cupy

    return cupy.asarray(a)


def launched_size() -> int:
    """How many processes the MPI launcher started (1 when not under mpiexec)."""
    for var in SIZE_VARS:
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    return 1


def world() -> Single | Mpi:
    """The communicator of this run: Mpi under `mpiexec -n N` (N > 1), else Single."""
    if launched_size() <= 1:
        return Single()
    try:
        from mpi4py import MPI
    except ImportError:
        raise RnncError(
            f"running under an MPI launcher with {launched_size()} processes needs mpi4py",
            hint='pip install "rnnc[mpi]" (mpi4py and the mpich wheel)',
            code="E560",
        ) from None
    comm = MPI.COMM_WORLD
    return Mpi(comm) if comm.Get_size() > 1 else Single()


def sharded(ins: dict, tgs: dict, lengths: dict | None, table: dict, comm):
    """This rank's contiguous share of a batch: (inputs, targets, lengths, its fraction of
    the batch, its rows as a slice). Shards differ by at most one sequence."""
    first = next(iter(ins))
    B = np.shape(ins[first])[1 if table[first][1] != "static" else 0]
    if comm.size == 1:
        return ins, tgs, lengths, 1.0, slice(0, B)
    if comm.size > B:
        raise RnncError(f"a batch of {B} cannot be shared by {comm.size} processes",
                        hint="a batch at least as large as the number of ranks", code="E561")  # fmt: skip
    bounds = np.linspace(0, B, comm.size + 1).round().astype(int)
    rows = slice(int(bounds[comm.rank]), int(bounds[comm.rank + 1]))
    per_step = lambda k: table.get(k, (None, "static"))[1] != "static"  # noqa: E731  (inits: [B, ...])
    cut = lambda d: {k: v[:, rows] if per_step(k) else v[rows] for k, v in d.items()}  # noqa: E731
    L = {k: v[rows] for k, v in lengths.items()} if lengths else None
    return cut(ins), cut(tgs), L, (rows.stop - rows.start) / B, rows
