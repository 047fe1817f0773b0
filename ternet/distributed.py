"""Collectives for data-parallel training, and the launchers that start the ranks.

One small interface, Collective: rank, world, allreduce_sum, broadcast, barrier, checksum_check.
Backends: `local` (one process: no-ops), `shm` (K CPU processes on one host: a multiprocessing
shared-memory segment and a barrier; the reduce adds rank 0's buffer, then rank 1's, ... so every
rank gets the same bits) and `nccl` (one process per GPU, ternet/nccl.py). Launchers: spawn() starts
K ranks on this host; from_env() joins a job started by mpirun / srun (one rank per GPU).
Exercise: pytest tests/test_distributed.py; docs/distributed.md.
"""
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
import uuid
import zlib
from multiprocessing import shared_memory

import numpy as np

from .kernels import to_host


class ReplicaDivergence(RuntimeError):
    """The replicas' weights, batch-norm parameters or statistics differ (see checksum_check)."""


class Collective:
    """Rank r of `world` processes that train one model on shards of one global batch.

    allreduce_sum(arrays): in place, every array becomes the sum over ranks, added in rank order
    (for nccl: in NCCL's order, the same result on every rank). reduce_shards(parts): the same
    over this rank's consecutive shards (each a list of arrays), into parts[0]. broadcast(arrays,
    root): in place, every rank gets root's values. Arrays live where the backend works: host
    arrays for local and shm, device arrays for nccl (`device`).
    """
    rank, world, local_world, device = 0, 1, 1, False

    def allreduce_sum(self, arrays):
        raise NotImplementedError

    def reduce_shards(self, parts):
        """parts[j]: the arrays of this rank's j-th shard. Leaves in parts[0] the sum over all
        shards of all ranks: this rank's in order, then (allreduce_sum) over ranks."""
        from .kernels.elementwise import add_forward
        for part in parts[1:]:
            for a, b in zip(parts[0], part):
                add_forward(a, a, b)
        self.allreduce_sum(parts[0])

    def broadcast(self, arrays, root=0):
        raise NotImplementedError

    def barrier(self):
        raise NotImplementedError

    def close(self):
        pass

    def _side(self, a):
        if not self.device:
            return a
        from numba import cuda
        return cuda.to_device(a)

    def _host(self, a):
        return to_host(a)

    def any(self, flag):
        """True on every rank when `flag` is true on at least one (e.g. a stop request)."""
        a = self._side(np.array([1.0 if flag else 0.0]))
        self.allreduce_sum([a])
        return float(self._host(a)[0]) > 0

    def checksum_check(self, model, step):
        """Compare a CRC-32 of every int8 state, real parameter, running statistic and sampler
        slot with rank 0's; raise ReplicaDivergence on every rank, naming the step, the ranks and
        their first differing tensor, when any differs. Costs one host copy of the model."""
        if self.world == 1:
            return
        names, mine = checksums(model)
        ref = self._side(mine.copy())
        self.broadcast([ref], root=0)
        diff = np.flatnonzero(self._host(ref) != mine)
        flags = np.zeros((self.world, 2), np.int64)
        if diff.size:
            flags[self.rank] = (diff[0] + 1, diff.size)
        dev = self._side(flags)
        self.allreduce_sum([dev])
        flags = self._host(dev)
        bad = [f"rank {r} ({n} tensors differ, first {names[first - 1]!r})"
               for r, (first, n) in enumerate(flags.tolist()) if first]
        if bad:
            raise ReplicaDivergence(f"replicas diverged by step {step}: {'; '.join(bad)} differ from rank 0. "
                                    "Same gradients and the same random stream should keep them identical: a "
                                    "rank saw other data or a different checkpoint, or its memory was corrupted")


def checksums(model):
    """(names, int64 CRC-32 per tensor) of the model's state and its sampler slots."""
    state = model.state_dict()
    named = [(n, a) for group in ("weights", "real", "buffers") for n, a in state[group].items()]
    for p in model.tparams():
        named += [(f"{p.name}/{k}", to_host(v))
                  for k, v in sorted(p.slots.items())]
    return [n for n, _ in named], np.array([zlib.crc32(np.ascontiguousarray(a).tobytes()) for _, a in named],
                                           np.int64)


class LocalCollective(Collective):
    """One process, world 1: nothing to reduce."""

    def allreduce_sum(self, arrays):
        pass

    def broadcast(self, arrays, root=0):
        pass

    def barrier(self):
        pass


# ----------------------------------------------------------------------------------------------
# shm: K processes of one host

ALIGN = 64


class ShmCollective(Collective):
    """CPU ranks of one host over a shared-memory segment of two halves, each with one slot per
    rank. A call writes this rank's arrays into its slot of the next half, waits at the barrier,
    then reads every slot: out = slot 0 + slot 1 + ... in rank order (identical on every rank).
    reduce_shards writes each shard apart and adds them all in shard order, so the sum is the
    same for every process count that divides the shard count (and equals one process's).
    Alternating halves make one barrier per call enough: a rank can only start writing a half
    again after every rank has passed the barrier of the call in between, i.e. finished reading.
    """

    def __init__(self, rank, world, barrier, prefix, timeout=None):
        self.rank, self.world, self.local_world = rank, world, world
        self._barrier, self.prefix, self.timeout = barrier, prefix, timeout
        self._shm, self._slot, self._gen, self._calls = None, 0, 0, 0

    def barrier(self):
        try:
            self._barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            raise RuntimeError(f"rank {self.rank}: another rank stopped (or the barrier timed out); "
                               "see its error above") from None

    def _grow(self, nbytes):
        self.barrier()            # every rank is done reading the old segment
        old = self._shm
        self._gen += 1
        self._slot = max(nbytes, 2 * self._slot)
        name, size = f"{self.prefix}-{self._gen}", 2 * self.world * self._slot
        if self.rank == 0:
            self._shm = shared_memory.SharedMemory(name, create=True, size=size)
        self.barrier()
        if self.rank != 0:
            self._shm = shared_memory.SharedMemory(name)
        if old is not None:
            old.close()
            if self.rank == 0:
                old.unlink()

    def _half(self, nbytes):
        """(world, slot) uint8 view of the next half, big enough for nbytes per rank."""
        if self._shm is None or nbytes > self._slot:
            self._grow(nbytes)
        h = self._calls % 2
        self._calls += 1
        w, s = self.world, self._slot
        return np.ndarray((w, s), np.uint8, self._shm.buf, offset=h * w * s)

    @staticmethod
    def _layout(arrays):
        offs, at = [], 0
        for a in arrays:
            if not isinstance(a, np.ndarray):
                raise TypeError("the shm collective reduces host arrays (CPU training); use --gpus for GPUs")
            offs.append(at)
            at += -(-a.nbytes // ALIGN) * ALIGN
        return offs, max(at, ALIGN)

    def _view(self, half, r, off, a):
        return half[r, off:off + a.nbytes].view(a.dtype).reshape(a.shape)

    def allreduce_sum(self, arrays):
        self.reduce_shards([arrays])

    def reduce_shards(self, parts):
        offs, total = self._layout(parts[0])
        half = self._half(total * len(parts))
        for j, part in enumerate(parts):
            for a, o in zip(part, offs):
                self._view(half, self.rank, j * total + o, a)[...] = a
        self.barrier()
        order = [(r, j) for r in range(self.world) for j in range(len(parts))]   # shard order
        for a, o in zip(parts[0], offs):
            np.copyto(a, self._view(half, 0, o, a))
            for r, j in order[1:]:
                np.add(a, self._view(half, r, j * total + o, a), out=a)

    def broadcast(self, arrays, root=0):
        offs, total = self._layout(arrays)
        half = self._half(total)
        if self.rank == root:
            for a, o in zip(arrays, offs):
                self._view(half, root, o, a)[...] = a
        self.barrier()
        if self.rank != root:
            for a, o in zip(arrays, offs):
                np.copyto(a, self._view(half, root, o, a))

    def close(self):
        if self._shm is not None:
            self._shm.close()
            if self.rank == 0:
                self._shm.unlink()
            self._shm = None


# ----------------------------------------------------------------------------------------------
# launchers

def spawn(world, backend, target, args=()):
    """Run target(collective, *args) in `world` new processes of this host (multiprocessing's
    spawn context), rank r with a `backend` ("shm" or "nccl") collective; rank r of nccl uses GPU r.
    Waits for all; when a rank fails, the others are released (shm) or stopped. Returns 0, or
    the exit code of the first rank that failed. SIGINT reaches the ranks from the terminal (they
    checkpoint and stop together); SIGTERM to this process is passed on to them."""
    if backend not in ("shm", "nccl"):
        raise ValueError(f"unknown collective backend {backend!r}")
    ctx = mp.get_context("spawn")
    tag = uuid.uuid4().hex[:12]
    spec = {"backend": backend, "world": world, "prefix": f"ternet-{tag}",
            "barrier": ctx.Barrier(world) if backend == "shm" else None,
            "id_file": os.path.join(_tmpdir(), f"ternet-nccl-{tag}.id") if backend == "nccl" else None}
    procs = [ctx.Process(target=_rank_main, args=(r, spec, target, args), name=f"ternet-rank{r}")
             for r in range(world)]
    for p in procs:               # (started before SIGINT is ignored here: children inherit an ignore)
        p.start()
    old = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
           signal.SIGTERM: signal.signal(signal.SIGTERM, lambda s, f: [p.terminate() for p in procs if p.is_alive()])}
    try:
        return _wait(procs, spec["barrier"])
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _wait(procs, barrier, grace=30.0):
    code, alive = 0, list(procs)
    while alive:
        done = multiprocessing.connection.wait([p.sentinel for p in alive], timeout=None if not code else grace)
        if not done:              # ranks still blocked after a failure (e.g. inside NCCL): stop them
            for p in alive:
                p.terminate()
            for p in alive:
                p.join(grace)
                if p.is_alive():
                    p.kill()
            break
        for p in [p for p in alive if p.sentinel in done]:
            p.join()
            alive.remove(p)
            if p.exitcode and not code:
                code = p.exitcode if p.exitcode > 0 else 128 - p.exitcode
                if barrier is not None:
                    barrier.abort()
    return code


def _tmpdir():
    return os.environ.get("TMPDIR", "/tmp")


def _rank_main(rank, spec, target, args):
    coll = make_collective(spec["backend"], rank, spec["world"], barrier=spec["barrier"], prefix=spec["prefix"],
                           id_file=spec["id_file"], local_rank=rank, local_world=spec["world"])
    try:
        code = target(coll, *args) or 0
    finally:
        coll.close()
    raise SystemExit(code)


def make_collective(backend, rank=0, world=1, *, barrier=None, prefix=None, id_file=None, local_rank=0,
                    local_world=None):
    """The collective of rank `rank` of `world` (world 1: local, whatever the backend)."""
    if backend == "local" or world == 1:
        return LocalCollective()
    if backend == "shm":
        import numba
        numba.set_num_threads(max(1, numba.config.NUMBA_NUM_THREADS // world))   # share the cores
        return ShmCollective(rank, world, barrier, prefix)
    if backend == "nccl":
        from .nccl import NcclCollective
        return NcclCollective(rank, world, id_file, local_rank, local_world)
    raise ValueError(f"unknown collective backend {backend!r}")


RANK_VARS = ("TERNET_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
WORLD_VARS = ("TERNET_WORLD", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
LOCAL_RANK_VARS = ("TERNET_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
LOCAL_WORLD_VARS = ("TERNET_LOCAL_WORLD", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


def _first_env(names, default=None):
    for n in names:
        v = os.environ.get(n, "")
        if v.strip():
            return int(v.split("(")[0])      # SLURM_NTASKS_PER_NODE may read "4(x2)"
    return default


def env_rank_world():
    """(rank, world, local_rank, local_world) from the launcher's environment variables
    (TERNET_*, Open MPI, MPICH/PMI, Slurm); (0, 1, 0, 1) outside such a job. local_world is
    None when the launcher does not say (the nccl collective then assumes one rank per GPU)."""
    rank, world = _first_env(RANK_VARS, 0), _first_env(WORLD_VARS, 1)
    local_rank = _first_env(LOCAL_RANK_VARS, rank)
    return rank, world, local_rank, _first_env(LOCAL_WORLD_VARS, None if world > 1 else 1)


def from_env():
    """The nccl collective of this rank of an mpirun / srun job (one process per GPU). The NCCL
    id travels through the file named by TERNET_NCCL_ID_FILE (on a filesystem every host sees)."""
    rank, world, local_rank, local_world = env_rank_world()
    id_file = os.environ.get("TERNET_NCCL_ID_FILE")
    if world > 1 and not id_file:
        raise ValueError("--launcher env: set TERNET_NCCL_ID_FILE to a fresh path on a filesystem all ranks see "
                         "(e.g. $HOME/.ternet-nccl-$SLURM_JOB_ID); rank 0 writes the NCCL id there")
    return make_collective("nccl", rank, world, id_file=id_file, local_rank=local_rank, local_world=local_world)
