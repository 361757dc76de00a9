"""Processes started by torchrun: who am I, and the few collectives the apps need.

Why through torch.distributed only: torchrun (or SLURM's ``srun torchrun``) starts the
processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; this module reads them, joins the process group
(gloo on CPU, NCCL on CUDA) and never launches anything itself. A world of one (no
torchrun) creates no process group, and every helper is then a plain no-op, so the
single-process path does no extra work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from seq2seq.runtime import cores

logger = logging.getLogger(__name__)

T = TypeVar("T")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class World:
    """This process's place among the ones torchrun started.

    Attributes:
        rank: 0 .. size - 1 over all machines; rank 0 alone writes files.
        size: number of processes over all machines.
        local_rank: 0 .. local_size - 1 on this machine (picks the GPU).
        local_size: number of processes on this machine (shares the cores).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """The one process that validates, logs and writes bundles and outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_env() -> World:
    """The world torchrun describes in the environment (a world of one without it)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    if size < 1:
        raise ValueError(f"WORLD_SIZE={size}; torchrun sets it to the number of processes")
    return World(
        rank=int(env.get("RANK", "0")),
        size=size,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
    )


def current() -> World:
    """The world of the process group this process has joined (one without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    env = from_env()
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=env.local_rank,
        local_size=env.local_size,
    )


def pick_backend(name: str) -> str:
    """``auto``: NCCL when CUDA is present (GPU tensors), gloo otherwise (CPU tensors)."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return name


@contextmanager
def process_group(*, backend: str = "auto", timeout: float = 1800.0) -> Iterator[World]:
    """Join torchrun's process group for the duration of the block; yields the world.

    Each process also gets its share of this machine's cores as intra-op threads
    (an explicit ``threads`` setting still overrides it later), because two
    processes each running one thread per core oversubscribe the CPU and wait on
    each other's spinning threads. On CUDA each process uses the GPU of its local rank.
    Without torchrun (a world of one) nothing is joined or changed.

    Args:
        backend: ``auto``, ``gloo`` or ``nccl``.
        timeout: seconds a collective waits for the slowest process before failing.
    """
    world = from_env()
    if not world.distributed:
        yield world
        return
    check_restartable()
    chosen = pick_backend(backend)
    if chosen == "nccl":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend=chosen, timeout=timedelta(seconds=timeout))
    torch.set_num_threads(max(1, cores() // world.local_size))
    logger.info(
        "rank %d of %d (local %d of %d), backend %s, %d threads",
        world.rank,
        world.size,
        world.local_rank,
        world.local_size,
        chosen,
        torch.get_num_threads(),
    )
    try:
        yield current()
    finally:
        dist.destroy_process_group()


class RestartError(ValueError):
    """A torchrun restart that cannot rejoin the process group."""


def check_restartable() -> None:
    """Fail clearly where a torchrun restart would fail obscurely.

    torchrun's agent by default lends its own key-value store to the workers, and
    on a restart (``--max-restarts``) the new workers find the dead ones' addresses
    there and cannot connect (pytorch/pytorch#135712). With
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` every restart gets a fresh store.

    Raises:
        RestartError: this is a restart with the shared store.
    """
    env = os.environ
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if shared and int(env.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        raise RestartError(
            "torchrun restarted the job, but its shared store keeps the failed "
            "processes' addresses; start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "to resume after a restart (--max-restarts)"
        )


def _device() -> torch.device:
    """Where the backend's tensors must live: the current GPU for NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over every process (float64, so token counts
    stay exact integers); the values themselves in a world of one."""
    if not current().distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every process (any picklable object).

    Why: a decision that ends or changes the loop (validation results, elapsed time)
    must be made once, on rank 0, and seen identically by every rank.
    """
    if not current().distributed:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def all_gather(value: T) -> list[T]:
    """Every process's ``value``, in rank order (``[value]`` in a world of one)."""
    world = current()
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    """Wait until every process gets here (nothing in a world of one)."""
    if current().distributed:
        dist.barrier()


@contextmanager
def main_first(world: World) -> Iterator[None]:
    """Run the block on rank 0 first, then on each machine's first process, then on
    the rest, so caches (tokenizer, token data) are built once and then loaded.

    Why three turns: rank 0 builds any cache on a shared filesystem; a machine that
    does not share it builds its own with one process while its others wait. An
    exception skips the remaining barriers: torchrun then stops the waiting processes.
    """
    turn = 0 if world.rank == 0 else 1 if world.local_rank == 0 else 2
    for _ in range(turn):
        barrier()
    yield
    for _ in range(turn, 3):
        barrier()
