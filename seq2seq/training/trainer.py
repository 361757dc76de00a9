"""The training loop: teacher forcing, validation, early stopping, checkpoints, resume.

Why resume is exact: batches come from ``(seed, epoch)`` alone and the trainer
state holds the epoch and the position inside it, the optimiser, the
scheduler and every RNG state. A run stopped after N steps and resumed
reaches the same weights as one that never stopped.

Under torchrun every process builds the same seeded epoch; a step takes the
next ``world size x train.accumulate`` batches and process ``r`` takes every
``world size``-th of them from ``r``. The loss is divided by the target tokens
of the whole step (summed over processes), so the averaged gradient equals one
process's over all those batches. Rank 0 alone validates and writes; what it
measures (validation metrics, elapsed time) is broadcast, so every process takes
the same decisions (best, learning rate, early stop, time budget).
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_model
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from seq2seq.config import OptimConfig, TrainApp
from seq2seq.data.batching import Batch, Pair, collate, encode_pairs, token_batches
from seq2seq.data.corpus import load_split
from seq2seq.data.store import TokenStore, prepare
from seq2seq.data.tokenizer import PAD_ID, Tokenizer
from seq2seq.decoding.translator import Translator
from seq2seq.metrics import bleu
from seq2seq.model import bundle as bundle_io
from seq2seq.model.model import Seq2Seq
from seq2seq.runtime import distributed
from seq2seq.runtime.device import pick_device, use_bf16
from seq2seq.training import rundir, snapshots

logger = logging.getLogger(__name__)

Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


class Reporter(Protocol):
    """Where progress goes; the app draws it, the library only calls it."""

    def on_step(self, step: int, loss: float, tokens_per_s: float) -> None: ...

    def on_record(self, record: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class FitResult:
    """Where the bundles are and how training ended."""

    best: Path
    last: Path
    best_bleu: float
    steps: int
    elapsed: float
    stop_reason: str


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


def build_optimizer(model: Seq2Seq, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over all parameters, fused where this torch supports it.

    Why fused: the default CPU implementation loops over parameters with about
    ten elementwise passes each; the fused kernel makes one. Torch before 2.4 has
    no fused CPU kernel and refuses; the multi-tensor version is used then.
    """
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    params = list(model.parameters())
    betas = (cfg.beta1, cfg.beta2)
    try:
        return cls(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, foreach=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> Scheduler | None:
    """``plateau`` halves the rate when validation BLEU stalls; ``warmup`` ramps
    linearly for ``warmup_steps`` then decays with the inverse square root."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="max",
            factor=cfg.plateau_factor,
            patience=cfg.plateau_patience,
            min_lr=cfg.min_lr,
        )
    if cfg.schedule == "warmup" and cfg.warmup_steps > 0:
        warm = cfg.warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / warm, math.sqrt(warm / (step + 1)))
        )
    return None


class Trainer:
    """Trains a Seq2Seq model and writes ``best`` and ``last`` bundles to a run dir."""

    data_counts: dict[str, Any] | None = None  # the training split's rows, for metrics.jsonl

    def __init__(
        self,
        model: Seq2Seq,
        tokenizer: Tokenizer,
        config: TrainApp,
        *,
        train_data: TokenStore,
        valid_pairs: list[Pair],
        valid_src: list[str],
        valid_ref: list[str],
        run_dir: Path,
        device: torch.device,
        reporter: Reporter | None = None,
    ) -> None:
        if not len(train_data):
            raise ValueError("no training pairs left after filtering; check data and filters")
        t = config.train
        if not (t.max_steps or t.max_epochs or t.max_time or t.patience):
            raise ValueError(
                "the run would never stop: set train.max_steps, train.max_epochs, "
                "train.max_time or train.patience"
            )
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.config = config
        self.train_data = train_data
        self.lengths = np.stack(  # (N, 2): source pieces, target pieces + EOS
            [train_data.src_lengths, train_data.tgt_lengths.astype(np.int32) + 1], axis=1
        )
        self.valid_pairs = valid_pairs
        self.valid_src = valid_src
        self.valid_ref = valid_ref
        self.run_dir = Path(run_dir)
        self.device = device
        self.reporter = reporter
        self.use_bf16 = use_bf16(config.train.precision, device)
        self.optimizer = build_optimizer(model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim)
        self.step = self.epoch = self.position = self.bad_validations = 0
        self.best_bleu = -1.0
        self.keep_best_above = -1.0  # BLEU of an existing best/ that a fresh start must beat
        self.elapsed = 0.0
        self.records: list[dict[str, Any]] = []
        self.run: rundir.Run | None = None  # the locked run directory (from_config opens it)
        self.world = distributed.current()
        self.ddp: DistributedDataParallel | None = None  # built at the first step
        if self.world.rank:  # each process its own dropout masks; rank 0 keeps the seed's
            torch.manual_seed(t.seed + self.world.rank)

    @classmethod
    def from_config(
        cls, config: TrainApp, *, run_dir: Path, reporter: Reporter | None = None
    ) -> Trainer:
        """Lock the run directory, then build the trainer (see `_build`); the lock is
        held until `fit` ends, so a second training stops before loading anything.

        Under torchrun rank 0 goes first: it takes the lock, recovers the checkpoint
        and builds the caches; the other processes then follow its run directory
        and load what it built.
        """
        world = distributed.current()
        with distributed.main_first(world):
            run = rundir.open_run(config, Path(run_dir), follower=not world.is_main)
            try:
                trainer = cls._build(config, run=run, run_dir=run_dir, reporter=reporter)
            except BaseException:
                run.close()
                raise
        trainer.run = run
        return trainer

    @classmethod
    def _build(
        cls, config: TrainApp, *, run: rundir.Run, run_dir: Path, reporter: Reporter | None
    ) -> Trainer:
        """Corpus -> tokenizer (the checkpoint's when resuming) -> token store (both
        cached) -> seeded model -> trainer."""
        t = config.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        prepared = prepare(config.data, config.tokenizer, tokenizer=run.checkpoint_tokenizer())
        tokenizer, train_data = prepared.tokenizer, prepared.store
        run.begin(data_key=prepared.data_key, tokenizer=tokenizer)
        valid = load_split(config.data, "valid")
        if config.model.share_embeddings and not tokenizer.joint:
            raise ValueError(
                "model.share_embeddings=true needs a joint vocabulary: set tokenizer.joint=true"
            )
        valid_pairs = encode_pairs(valid["src"], valid["tgt"], tokenizer)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        model = Seq2Seq.from_config(
            config.model,
            src_vocab=tokenizer.src_vocab_size,
            tgt_vocab=tokenizer.tgt_vocab_size,
            pad_id=PAD_ID,
        )
        logger.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
        trainer = cls(
            model,
            tokenizer,
            config,
            train_data=train_data,
            valid_pairs=valid_pairs,
            valid_src=list(valid["src"]),
            valid_ref=list(valid["tgt"]),
            run_dir=run_dir,
            device=pick_device(t.device, local_rank=distributed.current().local_rank),
            reporter=reporter,
        )
        trainer.data_counts = prepared.counts
        return trainer

    # ----------------------------------------------------------------- public

    def fit(self) -> FitResult:
        """Train until a budget runs out or validation BLEU stops improving.

        The run directory stays locked until the end (`seq2seq.training.rundir`); a run that
        already finished under the current budgets returns without training.
        """
        run = self.run or rundir.open_run(self.config, self.run_dir)
        try:
            return self._fit(run)
        finally:
            run.close()
            self.run = None

    def _fit(self, run: rundir.Run) -> FitResult:
        t = self.config.train
        self._maybe_resume(run.checkpoint)
        reason = self._nothing_left()
        if reason and run.finished:
            logger.info("the run already finished at step %d: %s", self.step, reason)
            return self._result(f"already finished: {reason}")
        run.mark("running")
        if self.data_counts is not None:
            self._record({"kind": "data", "split": "train", **self.data_counts})
        start = time.monotonic() - self.elapsed
        window_loss, window_tokens, window_start = 0.0, 0, time.monotonic()
        per_step = self.world.size * t.accumulate  # batches per optimiser step, all processes
        while not reason:
            batches = token_batches(
                self.lengths, max_tokens=t.max_tokens, seed=t.seed, epoch=self.epoch
            )
            while self.position < len(batches) and not reason:
                step_batches = batches[self.position : self.position + per_step]
                mine = step_batches[self.world.rank :: self.world.size]
                loss, tokens = self._train_step(
                    [self.train_data.batch(idx) for idx in mine or step_batches[:1]],
                    weight=1.0 if mine else 0.0,
                )
                self.position += len(step_batches)
                self.step += 1
                window_loss, window_tokens = window_loss + loss, window_tokens + tokens
                self.elapsed = distributed.broadcast(time.monotonic() - start)
                if self.reporter:
                    rate = window_tokens / max(1e-9, time.monotonic() - window_start)
                    self.reporter.on_step(self.step, loss / max(1, tokens), rate)
                if self.step % t.log_every == 0:
                    self._log_train(window_loss, window_tokens, time.monotonic() - window_start)
                    window_loss, window_tokens, window_start = 0.0, 0, time.monotonic()
                if self.step % t.valid_every == 0:
                    reason = self._validate_and_checkpoint(regular=True)
                    window_start = time.monotonic()
                reason = reason or self._budget_exhausted(len(batches))
            if self.position >= len(batches):
                self.epoch += 1
                self.position = 0
                reason = reason or self._budget_exhausted(len(batches))
        if self.step % t.valid_every != 0 and not self._validated_at_this_step():
            self._validate_and_checkpoint(regular=False)
        if self.world.is_main:
            self._average_snapshots()
        distributed.barrier()  # no process ends before rank 0 has written the bundles
        run.mark("finished", reason)
        logger.info("training stopped at step %d: %s", self.step, reason)
        return self._result(reason)

    def _result(self, reason: str) -> FitResult:
        return FitResult(
            best=self.run_dir / "best",
            last=self.run_dir / "last",
            best_bleu=max(self.best_bleu, self.keep_best_above),
            steps=self.step,
            elapsed=self.elapsed,
            stop_reason=reason,
        )

    def _nothing_left(self) -> str:
        """Why a resumed run has no step left to train ("" when it has); a partly
        trained epoch counts as not done."""
        patience = self.config.train.patience
        if patience and self.bad_validations >= patience:
            return f"early stopping: no BLEU gain in {patience} validations"
        return self._budget_exhausted(sys.maxsize)

    def _validated_at_this_step(self) -> bool:
        """The final validation already ran (a resume after it, before the run ended)."""
        return any(r["kind"] == "valid" and r["step"] == self.step for r in self.records[-3:])

    def validate(self) -> dict[str, float]:
        """Validation loss, perplexity and greedy BLEU (detokenised sacreBLEU)."""
        self.model.eval()
        total, tokens = 0.0, 0
        lengths = [(len(s), len(t) + 1) for s, t in self.valid_pairs]
        with torch.inference_mode(), self._autocast():
            for idx in token_batches(lengths, max_tokens=self.config.train.max_tokens):
                batch = collate([self.valid_pairs[i] for i in idx]).to(self.device)
                loss, n = self.model.loss(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_out)
                total, tokens = total + float(loss), tokens + n
        mean = total / max(1, tokens)
        return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "bleu": self.greedy_bleu()}

    def greedy_bleu(self) -> float:
        """Greedy BLEU of the model being trained on (the first
        ``train.valid_max_sentences`` of) the validation set."""
        return greedy_bleu(
            Translator(self.model, self.tokenizer, self.config.decode, device=self.device),
            self.valid_src,
            self.valid_ref,
            limit=self.config.train.valid_max_sentences,
        )

    # ---------------------------------------------------------------- one step

    def _train_step(self, batches: list[Batch], *, weight: float = 1.0) -> tuple[float, int]:
        """One optimiser step over this process's batches of the step; returns their
        summed loss and target tokens.

        Each batch's summed loss is divided by the target tokens of the whole step
        (all batches, all processes) and multiplied by the world size, which
        DistributedDataParallel's gradient average divides out again. ``weight=0``
        marks a stand-in batch for a process with no share of an epoch's last step:
        every process must run backward, and a zero weight adds nothing.
        """
        t = self.config.train
        self.model.train()
        mine = sum(b.n_tokens for b in batches) if weight else 0
        [total] = distributed.all_reduce_sum([float(mine)])
        scale = weight * self.world.size
        summed = 0.0
        for k, cpu_batch in enumerate(batches):
            batch = cpu_batch.to(self.device)
            tgt_in = batch.tgt_in if t.teacher_forcing >= 1.0 else self._sampled_inputs(batch)
            with self._gradient_sync(k == len(batches) - 1), self._autocast():
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
        smoothing = self.config.train.label_smoothing
        if not self.world.distributed:
            return self.model.loss(src, src_lengths, tgt_in, tgt_out, label_smoothing=smoothing)
        if self.ddp is None:  # here, not in __init__: its construction is a collective
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(TrainLoss(self.model), device_ids=ids)
        return self.ddp(src, src_lengths, tgt_in, tgt_out, smoothing)

    def _gradient_sync(self, sync: bool) -> Any:
        """Gradients are averaged over processes on a step's last backward only."""
        if sync or self.ddp is None:
            return nullcontext()
        return self.ddp.no_sync()

    def _sampled_inputs(self, batch: Batch) -> Tensor:
        """Scheduled sampling, in parallel (Mihaylova & Martins, 2019).

        A first teacher-forced pass predicts every position; each decoder input
        after BOS is then replaced by the model's own previous prediction with
        probability ``1 - teacher_forcing``. The second pass (with gradients)
        reads the mixed inputs, so the fused decoder needs no step loop.
        """
        with torch.no_grad(), self._autocast():
            logits, _ = self.model(batch.src, batch.src_lengths, batch.tgt_in)
        predicted = logits.argmax(-1)[:, :-1]
        gold = batch.tgt_in[:, 1:]
        use_model = torch.rand(gold.shape, device=gold.device) >= self.config.train.teacher_forcing
        use_model &= gold != PAD_ID
        mixed = torch.where(use_model, predicted, gold)
        return torch.cat([batch.tgt_in[:, :1], mixed], dim=1)

    def _autocast(self) -> Any:
        if not self.use_bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------ validation, budgets

    def _validate_and_checkpoint(self, *, regular: bool) -> str:
        """Validate, keep best and last; only regular validations drive the
        scheduler and patience (the extra one at the end must not change what
        a resumed run would do). Rank 0 validates and every process takes its
        results, so all make the same decisions; only rank 0 writes."""
        metrics = distributed.broadcast(self.validate() if self.world.is_main else {})
        improved = metrics["bleu"] > self.best_bleu
        if improved:
            self.best_bleu = metrics["bleu"]
        if regular:
            self.bad_validations = 0 if improved else self.bad_validations + 1
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(metrics["bleu"])
        self._record({"kind": "valid", **metrics, "best_bleu": self.best_bleu})
        rngs = distributed.all_gather(_rng_state(self.device))
        if self.world.is_main:
            if improved and metrics["bleu"] > self.keep_best_above:
                self._save(self.run_dir / "best", with_state=False)
            if regular and self.config.train.average_last > 1:
                snapshots.take_snapshot(
                    self.model, self.run_dir, self.step, keep=self.config.train.average_last
                )
            self._save(self.run_dir / "last", with_state=True, rngs=rngs)
        patience = self.config.train.patience
        if regular and patience and self.bad_validations >= patience:
            return f"early stopping: no BLEU gain in {patience} validations"
        return ""

    def _average_snapshots(self) -> None:
        """Validate the mean of the last ``average_last`` snapshots, write it as
        the ``average`` bundle, and make it ``best`` if it validates better.

        The trained weights are put back afterwards, so ``last`` and the model
        in memory stay what training reached.
        """
        files = snapshots.list_snapshots(self.run_dir)
        if self.config.train.average_last < 2 or len(files) < 2:
            return
        trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        snapshots.load_average(self.model, files)
        metrics = self.validate()
        improved = metrics["bleu"] > self.best_bleu
        if improved:
            self.best_bleu = metrics["bleu"]
        self._record(
            {"kind": "average", "snapshots": len(files), **metrics, "best_bleu": self.best_bleu}
        )
        self._save(self.run_dir / "average", with_state=False)
        if improved and metrics["bleu"] > self.keep_best_above:
            self._save(self.run_dir / "best", with_state=False)
        self.model.load_state_dict(trained)

    def _budget_exhausted(self, epoch_batches: int) -> str:
        t = self.config.train
        if t.max_steps and self.step >= t.max_steps:
            return f"max_steps={t.max_steps} reached"
        if t.max_epochs and self.epoch + self.position / max(1, epoch_batches) >= t.max_epochs:
            return f"max_epochs={t.max_epochs} reached"
        if t.max_time and self.elapsed >= t.max_time:
            return f"max_time={t.max_time:g}s reached"
        return ""

    def _log_train(self, loss: float, tokens: int, seconds: float) -> None:
        """Loss and target tokens/s of the window, summed over all processes."""
        loss, tokens_sum = distributed.all_reduce_sum([loss, float(tokens)])
        self._record(
            {
                "kind": "train",
                "loss": loss / max(1.0, tokens_sum),
                "tokens_per_s": tokens_sum / max(1e-9, seconds),
                "lr": self.optimizer.param_groups[0]["lr"],
                "world_size": self.world.size,
            }
        )

    def _record(self, fields: dict[str, Any]) -> None:
        record = {"step": self.step, "epoch": self.epoch, "elapsed": round(self.elapsed, 2)}
        record.update(fields)
        self.records.append(record)
        if self.world.is_main:
            append_record(self.run_dir, record, self.reporter)

    # ------------------------------------------------------------- checkpoints

    def _save(self, path: Path, *, with_state: bool, rngs: list[Any] | None = None) -> None:
        bundle_io.save(
            path,
            model=self.model,
            config=self.config,
            tokenizer=self.tokenizer,
            metrics=self.records,
            trainer_state=self._state(rngs or []) if with_state else None,
        )

    def _state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything resume needs; ``rngs`` holds every process's RNG states, the
        other processes' are kept beside rank 0's (``rank_rng``)."""
        state: dict[str, Any] = {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "best_bleu": self.best_bleu,
            "bad_validations": self.bad_validations,
            "elapsed": self.elapsed,
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        state["world_size"] = self.world.size
        state["accumulate"] = self.config.train.accumulate
        if len(rngs) > 1:
            state["rank_rng"] = rngs[1:]
        return state

    def _maybe_resume(self, last: Path | None) -> None:
        """Continue from checkpoint ``last`` (found by `rundir.open_run`), if any, with
        changed optimiser settings taking effect; a fresh start keeps an existing
        ``best/`` until a better model replaces it."""
        self.keep_best_above = rundir.recorded_best_bleu(self.run_dir)
        state = bundle_io.load_trainer_state(last) if last is not None else None
        if last is None or state is None:
            return
        _check_world(state, last, world=self.world.size, accumulate=self.config.train.accumulate)
        load_model(self.model, str(last / bundle_io.WEIGHTS), device=str(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        saved = bundle_io.load_config(last).optim
        same_schedule = saved.schedule == self.config.optim.schedule
        if self.scheduler is not None and "scheduler" in state and same_schedule:
            self.scheduler.load_state_dict(state["scheduler"])
        rundir.apply_optim_changes(
            self.optimizer.param_groups, self.scheduler, saved, self.config.optim
        )
        for key in ("step", "epoch", "position", "bad_validations"):
            setattr(self, key, int(state[key]))
        self.best_bleu = float(state["best_bleu"])
        self.elapsed = float(state["elapsed"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.world.rank:
            seed = self.config.train.seed + 7919 * self.step + self.world.rank
            _restore_rank_rng(state, self.world.rank, self.device, seed)
        self.records = rundir.records_until(self.run_dir, last, self.step)
        if self.world.is_main:
            bundle_io.atomic_write_bytes(
                self.run_dir / bundle_io.METRICS,
                "".join(json.dumps(r) + "\n" for r in self.records).encode(),
            )
        logger.info("resumed from %s at step %d (epoch %d)", last, self.step, self.epoch)


def _check_world(state: dict[str, Any], last: Path, *, world: int, accumulate: int) -> None:
    """Resume needs the same batches per optimiser step (world size x
    ``train.accumulate``); with the same world size it is exact, with another one
    only dropout's random stream differs."""
    then, then_accumulate = int(state.get("world_size", 1)), int(state.get("accumulate", 1))
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


def _restore_rank_rng(state: dict[str, Any], rank: int, device: torch.device, seed: int) -> None:
    """Process ``rank``'s (> 0) RNG states from the checkpoint, or ``seed`` when the
    checkpoint was written by fewer processes."""
    saved = state.get("rank_rng", [])
    if rank > len(saved):
        torch.manual_seed(seed)
        return
    mine = saved[rank - 1]
    torch.set_rng_state(mine["torch"])
    random.setstate(mine["python"])
    if "cuda" in mine and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states (what dropout and scheduled sampling draw from)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def append_record(run_dir: Path, record: dict[str, Any], reporter: Reporter | None) -> None:
    """Append one metrics record to ``run_dir/metrics.jsonl``, log it and report it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / bundle_io.METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
    logger.debug("%s", record)  # metrics.jsonl is the record; the terminal gets the reporter
    if reporter:
        reporter.on_record(record)


def greedy_bleu(translator: Translator, src: list[str], ref: list[str], *, limit: int) -> float:
    """Greedy BLEU on the first ``limit`` sentences (all when 0): what validation tracks."""
    limit = limit or len(src)
    greedy_translator = translator.with_decode(beam_size=1, nbest=1)
    return bleu(greedy_translator.translate(src[:limit]), ref[:limit])
