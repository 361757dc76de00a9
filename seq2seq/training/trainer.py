"""The training loop: teacher forcing, validation, early stopping, checkpoints.

Under torchrun every process builds the same seeded epoch; a step takes the
next ``world size x train.accumulate`` batches and process ``r`` takes every
``world size``-th of them from ``r``. The loss is divided by the target tokens
of the whole step (summed over processes), so the averaged gradient equals one
process's over all those batches. Rank 0 alone validates and writes; what it
measures (validation scores, elapsed time) is broadcast, so every process takes
the same decisions (best, learning rate, early stop, time budget).

Where training stands is one frozen `TrainerState`, replaced as the loop
advances and saved with every checkpoint (`seq2seq.training.state`), which is
why a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from seq2seq.config import TrainApp, TrainingConfig
from seq2seq.data import sampling
from seq2seq.data.batching import Batch, token_batches
from seq2seq.data.store import TokenStore
from seq2seq.data.tokenizer import PAD_ID, Tokenizer
from seq2seq.model import bundle as bundle_io
from seq2seq.model.model import Seq2Seq
from seq2seq.runtime import distributed
from seq2seq.runtime.device import batch_to_device, pick_device, use_bf16
from seq2seq.training import records, rundir, setup, snapshots, validation
from seq2seq.training.optim import Scheduler, build_optimizer, build_scheduler
from seq2seq.training.records import (
    AverageRecord,
    DataRecord,
    Record,
    Reporter,
    TrainRecord,
    ValidRecord,
)
from seq2seq.training.state import Checkpoint, RngState, TrainerState, resume
from seq2seq.training.validation import Scores, ValidSet

logger = logging.getLogger(__name__)

Plateau = torch.optim.lr_scheduler.ReduceLROnPlateau


@dataclass(frozen=True)
class FitResult:
    """Where the bundles are and how training ended."""

    best: Path
    last: Path
    best_bleu: float
    steps: int
    elapsed: float
    stop_reason: str

    @classmethod
    def of(cls, run_dir: Path, state: TrainerState, best_bleu: float, reason: str) -> FitResult:
        return cls(run_dir / "best", run_dir / "last", best_bleu, state.step, state.elapsed, reason)


class TrainLoss(nn.Module):
    """``Seq2Seq.loss`` as a module's ``forward``: DistributedDataParallel hooks only
    ``forward``, so the loss must be reached through one to synchronise gradients."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, tgt_out: Tensor, smoothing: float
    ) -> tuple[Tensor, int]:
        return self.model.loss(src, src_lengths, tgt_in, tgt_out, label_smoothing=smoothing)


class Trainer:
    """Trains a Seq2Seq model and writes ``best`` and ``last`` bundles to an open run."""

    def __init__(
        self,
        model: Seq2Seq,
        tokenizer: Tokenizer,
        config: TrainApp,
        *,
        run: rundir.Run,
        train_data: TokenStore,
        valid: ValidSet,
        device: torch.device,
        reporter: Reporter | None = None,
    ) -> None:
        _check_can_train(config, train_data)
        t = config.train
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.config = config
        self.run = run
        self.run_dir = run.run_dir
        self.train_data = train_data
        self.lengths = np.stack(  # (N, 2): source pieces, target pieces + EOS
            [train_data.src_lengths, train_data.tgt_lengths.astype(np.int32) + 1], axis=1
        )
        self.valid = valid
        self.device = device
        self.reporter = reporter
        self.optimizer = build_optimizer(model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, t.max_steps)
        self.world = distributed.current()
        self.stepper = StepRunner(self.model, self.optimizer, self.scheduler, t, device)
        self.use_bf16 = self.stepper.use_bf16
        self.state = TrainerState(world_size=self.world.size, accumulate=t.accumulate)
        self.keep_best_above = -1.0  # BLEU of an existing best/ that a fresh start must beat
        self.records: list[Record] = []
        self.sampled: sampling.SampledEpochs | None = None  # subword regularisation, in `fit`
        if self.world.rank:  # each process its own dropout masks; rank 0 keeps the seed's
            torch.manual_seed(t.seed + self.world.rank)

    @classmethod
    def from_config(
        cls, config: TrainApp, *, run_dir: Path, reporter: Reporter | None = None
    ) -> Trainer:
        """Lock the run directory (until `fit` ends, so a second training stops before
        loading anything), then build the trainer (`setup.build`). Under torchrun rank 0
        goes first: it takes the lock, recovers the checkpoint and builds the caches."""
        world = distributed.current()
        with distributed.main_first(world):
            run = rundir.open_run(config, Path(run_dir), follower=not world.is_main)
            try:
                parts = setup.build(config, run)
                device = pick_device(config.train.device, local_rank=world.local_rank)
                return cls(
                    parts.model,
                    parts.tokenizer,
                    config,
                    run=run,
                    train_data=parts.store,
                    valid=parts.valid,
                    device=device,
                    reporter=reporter,
                )
            except BaseException:
                run.close()
                raise

    def fit(self, *, on_accepted: Callable[[], None] | None = None) -> FitResult:
        """Train until a budget runs out or validation BLEU stops improving; a run
        that already finished under the current budgets returns without training.
        ``on_accepted`` is called (by rank 0) once the checkpoint was resumed and
        training is about to start: a refused run never reaches it."""
        try:
            self.sampled = sampling.for_training(self.config, self.train_data, self.tokenizer)
            return self._fit(on_accepted)
        finally:
            if self.sampled is not None:
                self.sampled.close()
            self.run.close()

    def _fit(self, on_accepted: Callable[[], None] | None) -> FitResult:
        t = self.config.train
        self._resume()
        reason = nothing_left(self.state, t)
        if reason and self.run.finished:
            logger.info("the run already finished at step %d: %s", self.state.step, reason)
            return self._result(f"already finished: {reason}")
        if on_accepted is not None and self.world.is_main:
            on_accepted()
        self.run.mark("running")
        self._record(DataRecord(*_when(self.state), **self.train_data.counts))
        start = time.monotonic() - self.state.elapsed
        window_loss, window_tokens, window_start = 0.0, 0, time.monotonic()
        per_step = self.world.size * t.accumulate  # batches per optimiser step, all processes
        while not reason:
            if self.sampled is not None:  # this epoch's own seeded segmentation
                self.train_data = self.sampled.epoch(self.state.epoch)
                self.lengths = sampling.pair_lengths(self.train_data)
            batches = token_batches(
                self.lengths, max_tokens=t.max_tokens, seed=t.seed, epoch=self.state.epoch
            )
            while self.state.position < len(batches) and not reason:
                s = self.state
                step_batches = batches[s.position : s.position + per_step]
                mine = step_batches[self.world.rank :: self.world.size]
                loss, tokens = self.train_step(
                    [self.train_data.batch(idx) for idx in mine or step_batches[:1]],
                    weight=1.0 if mine else 0.0,
                )
                elapsed = distributed.broadcast(time.monotonic() - start)
                self.state = s = replace(
                    s, step=s.step + 1, position=s.position + len(step_batches), elapsed=elapsed
                )
                window_loss, window_tokens = window_loss + loss, window_tokens + tokens
                if self.reporter:
                    rate = window_tokens / max(1e-9, time.monotonic() - window_start)
                    self.reporter.on_step(s.step, loss / max(1, tokens), rate)
                if s.step % t.log_every == 0:
                    self._log_train(window_loss, window_tokens, time.monotonic() - window_start)
                    window_loss, window_tokens, window_start = 0.0, 0, time.monotonic()
                if s.step % t.valid_every == 0:
                    reason = self._validate_and_checkpoint(regular=True)
                    window_start = time.monotonic()
                reason = reason or budget_exhausted(self.state, t, len(batches))
            if self.state.position >= len(batches):
                self.state = replace(self.state, epoch=self.state.epoch + 1, position=0)
                reason = reason or budget_exhausted(self.state, t, len(batches))
        if self.state.validated_step != self.state.step:
            self._validate_and_checkpoint(regular=False)
        if self.world.is_main:
            self._average_snapshots()
        distributed.barrier()  # no process ends before rank 0 has written the bundles
        self.run.mark("finished", reason)
        logger.info("training stopped at step %d: %s", self.state.step, reason)
        return self._result(reason)

    def _result(self, reason: str) -> FitResult:
        best_bleu = max(self.state.best_bleu, self.keep_best_above)
        return FitResult.of(self.run_dir, self.state, best_bleu, reason)

    def train_step(self, batches: list[Batch], *, weight: float = 1.0) -> tuple[float, int]:
        """One optimiser step over this process's ``batches`` (`StepRunner.step`)."""
        return self.stepper.step(batches, weight=weight)

    def _validate(self) -> Scores:
        return validation.validate(
            self.model,
            self.tokenizer,
            self.valid,
            self.config,
            device=self.device,
            autocast=self.stepper.autocast,
        )

    def _validate_and_checkpoint(self, *, regular: bool) -> str:
        """Validate, keep best and last; only regular validations drive the
        scheduler and patience (the extra one at the end must not change what
        a resumed run would do). Rank 0 validates and every process takes its
        scores, so all make the same decisions; only rank 0 writes."""
        scores = distributed.broadcast(self._validate() if self.world.is_main else None)
        assert scores is not None
        s = self.state
        improved = scores.bleu > s.best_bleu
        best = scores.bleu if improved else s.best_bleu
        bad = (0 if improved else s.bad_validations + 1) if regular else s.bad_validations
        self.state = s = replace(s, best_bleu=best, bad_validations=bad, validated_step=s.step)
        if regular and isinstance(self.scheduler, Plateau):
            self.scheduler.step(scores.bleu)
        self._record(ValidRecord(*_when(s), *_scores(scores), best))
        rngs = distributed.all_gather(RngState.capture(self.device))
        if self.world.is_main:
            if improved and scores.bleu > self.keep_best_above:
                self._save(self.run_dir / "best")
            if regular and self.config.train.average_last > 1:
                keep = self.config.train.average_last
                snapshots.take_snapshot(self.model, self.run_dir, s.step, keep=keep)
            scheduler = self.scheduler.state_dict() if self.scheduler is not None else None
            checkpoint = Checkpoint(s, self.optimizer.state_dict(), scheduler, tuple(rngs))
            self._save(self.run_dir / "last", checkpoint)
        return early_stop(s, self.config.train) if regular else ""

    def _average_snapshots(self) -> None:
        """Validate the mean of the last ``average_last`` snapshots, write it as
        the ``average`` bundle, and make it ``best`` if it validates better."""
        files = snapshots.list_snapshots(self.run_dir)
        if self.config.train.average_last < 2 or len(files) < 2:
            return
        with validation.averaged(self.model, files):
            scores = self._validate()
            s = self.state
            improved = scores.bleu > s.best_bleu
            self.state = s = replace(s, best_bleu=max(scores.bleu, s.best_bleu))
            step, epoch, elapsed = _when(s)
            self._record(
                AverageRecord(step, epoch, elapsed, len(files), *_scores(scores), s.best_bleu)
            )
            self._save(self.run_dir / "average")
            if improved and scores.bleu > self.keep_best_above:
                self._save(self.run_dir / "best")

    def _log_train(self, loss: float, tokens: int, seconds: float) -> None:
        """Loss and target tokens/s of the window, summed over all processes."""
        loss, total = distributed.all_reduce_sum([loss, float(tokens)])
        rate, lr = total / max(1e-9, seconds), self.optimizer.param_groups[0]["lr"]
        record = TrainRecord(*_when(self.state), loss / max(1.0, total), rate, lr, self.world.size)
        self._record(record)

    def _record(self, record: Record) -> None:
        self.records.append(record)
        if self.world.is_main:
            records.append(self.run_dir, record)
            if self.reporter:
                self.reporter.on_record(record)

    def _save(self, path: Path, checkpoint: Checkpoint | None = None) -> None:
        bundle_io.save(
            path,
            model=self.model,
            config=self.config,
            tokenizer=self.tokenizer,
            metrics=[records.to_json(r) for r in self.records],
            trainer_state=checkpoint.to_record() if checkpoint else None,
        )

    def _resume(self) -> None:
        """Continue from the run's checkpoint, if any; a fresh start keeps an
        existing ``best/`` until a better model replaces it."""
        self.keep_best_above = records.recorded_best_bleu(self.run_dir)
        last = self.run.checkpoint
        if last is None:
            return
        resumed = resume(
            last,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            config=self.config,
            world=self.world,
            device=self.device,
        )
        if resumed is None:
            return
        self.state = resumed
        self.records = records.records_until(self.run_dir, last, resumed.step)
        if self.world.is_main:
            records.rewrite(self.run_dir, self.records)
        logger.info("resumed from %s at step %d (epoch %d)", last, resumed.step, resumed.epoch)


class StepRunner:
    """One optimiser step: accumulation over a step's batches, gradients averaged
    over processes by DistributedDataParallel under torchrun, scheduled sampling
    and bf16 autocast where the hardware computes bf16 natively."""

    def __init__(
        self,
        model: Seq2Seq,
        optimizer: torch.optim.Optimizer,
        scheduler: Scheduler | None,
        t: TrainingConfig,
        device: torch.device,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.t, self.device = t, device
        self.world = distributed.current()
        self.use_bf16 = use_bf16(t.precision, device)
        # Built at the first step: its construction is a collective, and processes
        # construct trainers one after another (see `Trainer.from_config`).
        self.ddp: DistributedDataParallel | None = None

    def step(self, batches: list[Batch], *, weight: float = 1.0) -> tuple[float, int]:
        """One optimiser step over this process's batches of the step; returns their
        summed loss and target tokens.

        Each batch's summed loss is divided by the target tokens of the whole step
        (all batches, all processes) and multiplied by the world size, which
        DistributedDataParallel's gradient average divides out again. ``weight=0``
        marks a stand-in batch for a process with no share of an epoch's last step:
        every process must run backward, and a zero weight adds nothing.
        """
        t = self.t
        self.model.train()
        mine = sum(b.n_tokens for b in batches) if weight else 0
        [total] = distributed.all_reduce_sum([float(mine)])
        scale = weight * self.world.size
        summed = 0.0
        for k, cpu_batch in enumerate(batches):
            batch = batch_to_device(cpu_batch, self.device)
            tgt_in = batch.tgt_in
            if t.teacher_forcing < 1.0:
                tgt_in = sampled_inputs(self.model, batch, t.teacher_forcing, self.autocast)
            with self._gradient_sync(k == len(batches) - 1), self.autocast():
                # the loss's softmax runs in float32 all the same
                loss, _ = self._loss(batch.src, batch.src_lengths, tgt_in, batch.tgt_out)
                (loss * scale / int(total)).backward()
            summed += float(loss.detach())
        if t.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            self.scheduler.step()
        return summed * weight, mine

    def _loss(
        self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, tgt_out: Tensor
    ) -> tuple[Tensor, int]:
        """The summed training loss and target tokens, through DDP under torchrun."""
        smoothing = self.t.label_smoothing
        if not self.world.distributed:
            return self.model.loss(src, src_lengths, tgt_in, tgt_out, label_smoothing=smoothing)
        if self.ddp is None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(TrainLoss(self.model), device_ids=ids)
        return self.ddp(src, src_lengths, tgt_in, tgt_out, smoothing)

    def _gradient_sync(self, sync: bool) -> AbstractContextManager[object]:
        """Gradients are averaged over processes on a step's last backward only."""
        if sync or self.ddp is None:
            return nullcontext()
        return self.ddp.no_sync()

    def autocast(self) -> AbstractContextManager[object]:
        if not self.use_bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def _when(state: TrainerState) -> tuple[int, int, float]:
    """A record's step, epoch and elapsed seconds."""
    return state.step, state.epoch, round(state.elapsed, 2)


def _scores(scores: Scores) -> tuple[float, float, float]:
    return scores.loss, scores.ppl, scores.bleu


def _check_can_train(config: TrainApp, train_data: TokenStore) -> None:
    if not len(train_data):
        raise ValueError("no training pairs left after filtering; check data and filters")
    t = config.train
    if not (t.max_steps or t.max_epochs or t.max_time or t.patience):
        raise ValueError(
            "the run would never stop: set train.max_steps, train.max_epochs, "
            "train.max_time or train.patience"
        )


def sampled_inputs(
    model: Seq2Seq,
    batch: Batch,
    teacher_forcing: float,
    autocast: Callable[[], AbstractContextManager[object]],
) -> Tensor:
    """Scheduled sampling, in parallel (Mihaylova & Martins, 2019).

    A first teacher-forced pass predicts every position; each decoder input
    after BOS is then replaced by the model's own previous prediction with
    probability ``1 - teacher_forcing``. The second pass (with gradients)
    reads the mixed inputs, so the fused decoder needs no step loop.
    """
    with torch.no_grad(), autocast():
        logits, _ = model(batch.src, batch.src_lengths, batch.tgt_in)
    predicted = logits.argmax(-1)[:, :-1]
    gold = batch.tgt_in[:, 1:]
    use_model = torch.rand(gold.shape, device=gold.device) >= teacher_forcing
    use_model &= gold != PAD_ID
    mixed = torch.where(use_model, predicted, gold)
    return torch.cat([batch.tgt_in[:, :1], mixed], dim=1)


def early_stop(state: TrainerState, t: TrainingConfig) -> str:
    """Why patience ends the run ("" while it does not)."""
    if t.patience and state.bad_validations >= t.patience:
        return f"early stopping: no BLEU gain in {t.patience} validations"
    return ""


def budget_exhausted(state: TrainerState, t: TrainingConfig, epoch_batches: int) -> str:
    """Which budget is spent ("" while none is); a partly trained epoch counts by
    the share of its batches done."""
    if t.max_steps and state.step >= t.max_steps:
        return f"max_steps={t.max_steps} reached"
    epochs = state.epoch + state.position / max(1, epoch_batches)
    if t.max_epochs and epochs >= t.max_epochs:
        return f"max_epochs={t.max_epochs} reached"
    if t.max_time and state.elapsed >= t.max_time:
        return f"max_time={t.max_time:g}s reached"
    return ""


def nothing_left(state: TrainerState, t: TrainingConfig) -> str:
    """Why a resumed run has no step left to train ("" when it has); a partly
    trained epoch counts as not done."""
    return early_stop(state, t) or budget_exhausted(state, t, sys.maxsize)
