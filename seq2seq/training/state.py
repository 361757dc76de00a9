"""Where training stands, and the checkpoint that lets it continue exactly.

Why resume is exact: batches come from ``(seed, epoch)`` alone, so the epoch and
the position inside it say which batch is next; with the weights, the
optimiser and scheduler states and every process's random states, a resumed
run reaches the same weights as one that never stopped.

`TrainerState` is what the loop advances (a new value per step, never edited
in place); `Checkpoint` adds what lives in torch objects. ``trainer_state.pt``
holds a `Checkpoint` as plain dicts and tensors, read with
``torch.load(weights_only=True)``; the layout written before the format was
numbered (rank 0's random states at the top, the other ranks' beside them) is
read too.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from torch import Tensor, nn

from seq2seq.config import TrainApp
from seq2seq.model import bundle as bundle_io
from seq2seq.runtime.distributed import World
from seq2seq.training.optim import Scheduler, apply_optim_changes

logger = logging.getLogger(__name__)

FORMAT = 2  # 1: the unnumbered layout, still read


class CheckpointError(ValueError):
    """A checkpoint's trainer state cannot be read by this version."""


@dataclass(frozen=True)
class TrainerState:
    """The loop's position and the decisions that depend on its history.

    ``validated_step`` is the step of the latest validation: a run resumed from
    the checkpoint of its final validation must not validate that step again.
    """

    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of the epoch already trained on, all processes
    best_bleu: float = -1.0
    bad_validations: int = 0  # regular validations since BLEU last improved
    elapsed: float = 0.0  # seconds of training, rank 0's clock
    validated_step: int = -1
    world_size: int = 1
    accumulate: int = 1


@dataclass(frozen=True)
class RngState:
    """One process's random states: what dropout and scheduled sampling draw from."""

    cpu: Tensor  # torch's default generator
    python: tuple[Any, ...]
    cuda: Tensor | None = None  # this process's GPU, when it trains on one

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), random.getstate(), cuda)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        random.setstate(self.python)
        if self.cuda is not None and device.type == "cuda":
            torch.cuda.set_rng_state(self.cuda, device)


@dataclass(frozen=True)
class Checkpoint:
    """Everything resume needs besides the weights; ``rng`` holds one `RngState`
    per process, in rank order."""

    state: TrainerState
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    rng: tuple[RngState, ...]

    def to_record(self) -> dict[str, Any]:
        """The plain dict ``trainer_state.pt`` holds."""
        return {
            "format": FORMAT,
            "state": dataclasses.asdict(self.state),
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "rng": [dataclasses.asdict(r) for r in self.rng],
        }

    @classmethod
    def from_record(cls, record: Any, where: Path) -> Checkpoint:
        """Read either layout; a newer or unknown one is refused naming its file."""
        if not isinstance(record, dict):
            raise CheckpointError(f"{where} holds no trainer state")
        version = record.get("format", 1)
        if version not in (1, FORMAT):
            raise CheckpointError(
                f"{where} was written in trainer-state format {version}; this version "
                f"reads formats 1-{FORMAT}: resume with the version that wrote it, or "
                "pass train.resume=false to start a fresh run"
            )
        try:
            return _unnumbered(record) if version == 1 else _numbered(record)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where} is not a complete trainer state ({e!r})") from e


def _numbered(record: dict[str, Any]) -> Checkpoint:
    return Checkpoint(
        state=TrainerState(**record["state"]),
        optimizer=record["optimizer"],
        scheduler=record["scheduler"],
        rng=tuple(RngState(**r) for r in record["rng"]),
    )


def _unnumbered(record: dict[str, Any]) -> Checkpoint:
    """The first layout: counters and rank 0's random states at the top level, the
    other ranks' under ``rank_rng``. Every checkpoint was written right after a
    validation at its step."""
    cuda = record.get("cuda_rng")
    rank0 = RngState(record["torch_rng"], record["python_rng"], cuda[0] if cuda else None)
    others = [RngState(r["torch"], r["python"], r.get("cuda")) for r in record.get("rank_rng", [])]
    step = int(record["step"])
    state = TrainerState(
        step=step,
        epoch=int(record["epoch"]),
        position=int(record["position"]),
        best_bleu=float(record["best_bleu"]),
        bad_validations=int(record["bad_validations"]),
        elapsed=float(record["elapsed"]),
        validated_step=step,
        world_size=int(record.get("world_size", 1)),
        accumulate=int(record.get("accumulate", 1)),
    )
    return Checkpoint(state, record["optimizer"], record.get("scheduler"), (rank0, *others))


def load(path: Path) -> Checkpoint | None:
    """The checkpoint of bundle ``path``, or None when it holds no trainer state."""
    record = bundle_io.load_trainer_state(path)
    if record is None:
        return None
    return Checkpoint.from_record(record, Path(path) / bundle_io.TRAINER_STATE)


def check_world(state: TrainerState, last: Path, *, world: int, accumulate: int) -> None:
    """Resume needs the same batches per optimiser step (world size x
    ``train.accumulate``); with the same world size it is exact, with another one
    only dropout's random stream differs."""
    then, then_accumulate = state.world_size, state.accumulate
    if then * then_accumulate != world * accumulate:
        raise ValueError(
            f"{last} was trained with {then} process(es) x train.accumulate={then_accumulate}"
            f" = {then * then_accumulate} batches per step; this run has {world} x"
            f" {accumulate}: set train.accumulate so the product is the same,"
            " or start a new run_dir (or pass train.resume=false)"
        )
    if then != world:
        logger.warning(
            "resuming a %d-process run with %d processes: same batches per step, "
            "but other dropout masks than an uninterrupted run",
            then,
            world,
        )


def resume(
    last: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler | None,
    config: TrainApp,
    world: World,
    device: torch.device,
) -> TrainerState | None:
    """Load checkpoint ``last`` into the model, optimiser, scheduler and this
    process's random states, with changed optimiser settings taking effect;
    returns where training stands (None: ``last`` holds no trainer state)."""
    checkpoint = load(last)
    if checkpoint is None:
        return None
    state = checkpoint.state
    check_world(state, last, world=world.size, accumulate=config.train.accumulate)
    load_model(model, str(last / bundle_io.WEIGHTS), device=str(device))
    optimizer.load_state_dict(checkpoint.optimizer)
    saved = bundle_io.load_config(last).optim
    same_schedule = saved.schedule == config.optim.schedule
    if scheduler is not None and checkpoint.scheduler is not None and same_schedule:
        scheduler.load_state_dict(checkpoint.scheduler)
    apply_optim_changes(optimizer.param_groups, scheduler, saved, config.optim)
    if world.rank < len(checkpoint.rng):
        checkpoint.rng[world.rank].restore(device)
    else:  # a checkpoint written by fewer processes: a fresh stream, seeded by the step
        checkpoint.rng[0].restore(device)
        torch.manual_seed(config.train.seed + 7919 * state.step + world.rank)
    return dataclasses.replace(state, world_size=world.size, accumulate=config.train.accumulate)
