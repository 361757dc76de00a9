"""``seq2seq-train``: config -> Trainer -> bundle path and validation BLEU."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from seq2seq._hydra import expected_errors, register_configs, run_hydra, to_app
from seq2seq.config import TrainApp, conf_dir
from seq2seq.runtime import distributed
from seq2seq.runtime.allocator import retain_freed_memory
from seq2seq.runtime.fs import write_text
from seq2seq.training.fit import fit
from seq2seq.training.records import DataRecord, EnsembleRecord, Record, TrainRecord

register_configs()
logger = logging.getLogger("seq2seq.train")
BUILTIN_RECIPE = "builtin"  # recipe/builtin.yaml, chosen by data=builtin
RECORD_DIR = ".hydra"  # where Hydra would keep its snapshot; conf/train.yaml turns Hydra's off


class ProgressBar:
    """One bar on stderr (step, loss, target tokens/s, learning rate) and one
    readable line per validation; ``metrics.jsonl`` keeps the full records."""

    def __init__(self) -> None:
        # Drawn from the first step on, so an early error line starts stderr cleanly.
        self._bar: tqdm | None = None
        self.lr = ""

    @property
    def bar(self) -> tqdm:
        if self._bar is None:
            self._bar = tqdm(desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
        return self._bar

    def close(self) -> None:
        """End the bar's line (before an error message or the summary)."""
        if self._bar is not None:
            self._bar.close()

    def on_step(self, step: int, loss: float, tokens_per_s: float) -> None:
        self.bar.n = step
        fields = {"loss": f"{loss:.3f}", "tok_s": f"{tokens_per_s:,.0f}"}
        self.bar.set_postfix(fields | ({"lr": self.lr} if self.lr else {}), refresh=False)
        self.bar.update(0)

    def on_record(self, record: Record) -> None:
        if isinstance(record, TrainRecord):
            self.lr = f"{record.lr:.2e}"
        elif isinstance(record, EnsembleRecord):  # after training: no bar to draw
            tqdm.write(f"ensemble of {record.members}: BLEU {record.bleu:.2f}")
        elif isinstance(record, DataRecord):
            if record.bad_rows:
                self.bar.write(f"skipped {record.bad_rows} bad rows of {record.lines}")
        else:
            self.bar.write(
                f"step {record.step}: {record.kind} loss {record.loss:.3f} "
                f"ppl {record.ppl:.2f} BLEU {record.bleu:.2f}"
            )


def _same_run_dir(run_dir: str) -> str:
    """Rank 0's run directory on every process: the default one is named by the
    start time, which processes started a second apart would see differently."""
    chosen = distributed.broadcast(run_dir)
    if chosen != run_dir:
        logger.warning(
            "run_dir %s differs from rank 0's; using %s (pass run_dir=)", run_dir, chosen
        )
    return chosen


def check_recipe(config: TrainApp, recipe: str | None) -> None:
    """The built-in corpus's recipe (chosen by ``data=builtin``, the default) sizes the
    vocabulary and the model for generated number words; on a corpus named by
    ``data.format`` or ``data.dir`` alone it would train a toy model silently."""
    data = config.data
    if recipe != BUILTIN_RECIPE or (data.format == "builtin" and not data.dir):
        return
    named = f"data.dir={data.dir}" if data.dir else f"data.format={data.format}"
    raise ValueError(
        f"{named} reads your own corpus, but data=builtin (the default) brings the "
        f"built-in corpus's recipe: add data=files to train with the general settings"
    )


def config_record(cfg: DictConfig) -> Callable[[], None]:
    """What writes the run's configuration record (``run_dir/.hydra``: the composed
    config, Hydra's own and the command-line overrides) once training accepted it.

    Why not Hydra's snapshot: Hydra writes it before the app starts, so a training
    the run directory refuses (other model settings, say) would leave a record
    that no longer describes the model trained there.
    """
    hydra_cfg = HydraConfig.get()
    texts = {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml({"hydra": hydra_cfg}),
        "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task),
    }
    folder = Path(hydra_cfg.runtime.output_dir) / RECORD_DIR

    def write() -> None:
        for name, text in texts.items():
            write_text(folder / name, text)

    return write


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def _app(cfg: DictConfig) -> None:
    with expected_errors(), closing(ProgressBar()) as bar:
        config = to_app(cfg, TrainApp)
        check_recipe(config, HydraConfig.get().runtime.choices.get("recipe"))
        retain_freed_memory()
        t = config.train
        with distributed.process_group(backend=str(t.backend), timeout=t.timeout) as world:
            config.run_dir = _same_run_dir(config.run_dir)
            if not world.is_main:  # one copy of the progress messages, rank 0's
                logging.getLogger("seq2seq").setLevel(logging.WARNING)
            with logging_redirect_tqdm():  # log lines print above the bar, not through it
                reporter = bar if world.is_main else None
                result = fit(
                    config,
                    run_dir=Path(config.run_dir),
                    reporter=reporter,
                    on_accepted=config_record(cfg),
                )
    if not world.is_main:
        return
    print(f"stopped after {result.steps} steps, {result.elapsed:.0f}s: {result.stop_reason}")
    print(f"best validation BLEU: {result.best_bleu:.2f}")
    print(f"model bundle: {result.best}")


def main() -> None:
    """Console entry point: ``seq2seq-train``."""
    run_hydra(_app)


if __name__ == "__main__":
    main()
