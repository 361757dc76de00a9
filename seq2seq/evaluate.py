"""``seq2seq-evaluate``: corpus BLEU, chrF and TER of a translation, with sacrebleu signatures.

Usage::

    seq2seq-evaluate hyp=FILE ref=FILE [json=REPORT.json]
    seq2seq-evaluate hyp=FILE ref=[FILE1,FILE2]            # several references
    seq2seq-evaluate model=BUNDLE src=FILE ref=FILE [decode.beam_size=5] [json=...]

Files are UTF-8 text, one sentence per line (``*.gz`` accepted). The report goes to
stdout as a table (metric, score, signature); ``json=FILE`` also writes
``{"BLEU": {"score": ..., "signature": ...}, "chrF2": ..., "TER": ...}``.

The headline number is cased, detokenised sacreBLEU (``tokenize=13a``): score
detokenised output against untouched references. ``lowercase=true`` and
``tokenize=intl|none|char|zh|...`` change BLEU only, for comparison with published
scores computed that way; the table header says so when they are used.

With ``model=`` the source is translated first, with the decoding settings of this
command's config (``conf/evaluate.yaml`` plus overrides, never the bundle's), and the
hypotheses are written next to the report, named after it (``json=out/test_b5.json``
gives ``out/test_b5.hyp.txt``, so reports with different settings keep their own), or
to ``hyp.txt`` in the current directory without ``json=``; the path is printed before
the table.

Neither the hypothesis file nor the report may be one of the inputs (refused before
anything is read); both are written whole or not at all.

Errors (missing files, invalid UTF-8, different line counts, which name both counts,
empty files) print ``error: ...`` on stderr and exit with code 2.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from sacrebleu.metrics.bleu import BLEU
from tqdm import tqdm

from seq2seq._hydra import expected_errors, register_configs, run_hydra, to_app
from seq2seq.config import EvaluateApp, conf_dir
from seq2seq.data.text import read_lines
from seq2seq.decoding.translator import Translator
from seq2seq.metrics import Score, corpus_scores, format_table, to_json
from seq2seq.runtime.fs import check_outputs, files_under, write_text

register_configs()
logger = logging.getLogger("seq2seq.evaluate")

HYP_FILE = "hyp.txt"
_CHUNK_SIZE = 1000  # lines sorted and translated together; also the progress-bar granularity
HEADLINE = "cased detokenised sacreBLEU (tokenize=13a)"


def hypothesis_path(config: EvaluateApp) -> Path:
    """Where ``model=`` mode writes its hypotheses: ``<report stem>.hyp.txt`` next to
    ``json=``, else ``hyp.txt`` in the current directory."""
    if not config.json:
        return Path.cwd() / HYP_FILE
    report = Path(config.json).expanduser()
    return report.with_name(f"{report.stem}.hyp.txt")


def header(config: EvaluateApp) -> str:
    """One line saying which BLEU this is; non-default settings are called out."""
    if not config.lowercase and config.tokenize == "13a":
        return f"BLEU: {HEADLINE}"
    changed = ", ".join(
        s
        for s in ("lowercase=true" if config.lowercase else "", f"tokenize={config.tokenize}")
        if s
    )
    return (
        f"BLEU with {changed}: for comparison with published scores computed that way "
        f"only, not the headline {HEADLINE}"
    )


def run(config: EvaluateApp) -> list[Score]:
    """Score hypotheses (read, or translated from ``src``) and print the report."""
    _check(config)
    _check_outputs(config)
    refs = [read_lines(path) for path in config.ref]
    if not refs[0]:
        raise ValueError(f"reference {config.ref[0]} has no lines; nothing to score")
    if config.model:
        hyps = _translate(config, n_refs=len(refs[0]))
    else:
        assert config.hyp is not None
        hyps = read_lines(config.hyp)
    scores = corpus_scores(hyps, refs, lowercase=config.lowercase, tokenize=config.tokenize)
    print(header(config))
    print(format_table(scores))
    if config.json:
        path = Path(config.json).expanduser()
        write_text(path, json.dumps(to_json(scores), indent=2) + "\n")
        logger.info("wrote %s", path)
    return scores


def _check(config: EvaluateApp) -> None:
    """Fail on inconsistent arguments before reading or translating anything."""
    if not config.ref:
        raise ValueError("no reference given; pass ref=FILE or ref=[FILE1,FILE2]")
    if config.model and config.hyp:
        raise ValueError("pass either hyp=FILE, or model=BUNDLE with src=FILE, not both")
    if config.model and not config.src:
        raise ValueError("model=BUNDLE needs the source to translate: pass src=FILE")
    if not config.model and not config.hyp:
        raise ValueError("nothing to score: pass hyp=FILE, or model=BUNDLE and src=FILE")
    if config.tokenize not in BLEU.TOKENIZERS:
        raise ValueError(
            f"tokenize={config.tokenize!r}; choose one of {', '.join(BLEU.TOKENIZERS)}"
        )
    _check_tokenizer(config.tokenize)


def _check_tokenizer(name: str) -> None:
    """Build the BLEU tokenizer once before any work: some need an optional package
    (``ja-mecab``, ``ko-mecab``), whose absence sacrebleu reports as a RuntimeError."""
    try:
        BLEU(tokenize=name)
    except RuntimeError as e:
        raise ImportError(
            f"tokenize={name} needs an optional package: {' '.join(str(e).split())}"
        ) from e


def _check_outputs(config: EvaluateApp) -> None:
    """Refuse a report or hypothesis file that is one of the inputs (checked by inode)."""
    inputs: dict[str, str | Path | None] = {"src": config.src, "hyp": config.hyp}
    inputs |= {f"ref {k}": ref for k, ref in enumerate(config.ref, start=1)}
    if config.model:
        inputs |= files_under(config.model)
    outputs = {"json": config.json}
    if config.model:
        outputs[f"the hypothesis file (from json=, else ./{HYP_FILE})"] = str(
            hypothesis_path(config)
        )
    check_outputs(outputs, inputs)


def _translate(config: EvaluateApp, *, n_refs: int) -> list[str]:
    """Translate ``config.src`` with the CLI's decoding settings and save the hypotheses."""
    assert config.model is not None and config.src is not None
    src = read_lines(config.src)
    if len(src) != n_refs:
        raise ValueError(f"source has {len(src)} lines but reference 1 has {n_refs}")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    translator = Translator.from_bundle(config.model, decode=config.decode, device=config.device)
    stream = translator.translate_stream(src, chunk_size=_CHUNK_SIZE)
    bar = tqdm(stream, total=len(src), desc="translate", unit="sent", file=sys.stderr, delay=1.0)
    hyps = [h[0].text.replace("\n", " ") if h else "" for h in bar]
    path = hypothesis_path(config)
    write_text(path, "".join(h + "\n" for h in hyps))
    print(f"hypotheses: {path}")
    return hyps


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="evaluate")
def _app(cfg: DictConfig) -> None:
    with expected_errors():
        run(to_app(cfg, EvaluateApp))


def listify_ref(args: list[str]) -> list[str]:
    """Rewrite ``ref=FILE`` as ``ref=['FILE']`` so one reference needs no brackets.

    Why: ``ref`` is a list in the schema, and Hydra refuses to merge a plain string
    into a list. The path is quoted so that any character (``~``, ``=``, spaces) works.
    """
    out = []
    for arg in args:
        if arg.startswith("ref=") and not arg[4:].lstrip().startswith("["):
            value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", arg[4:])
            value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
            arg = f"ref=['{value}']"
        out.append(arg)
    return out


def main() -> None:
    """Console entry point: ``seq2seq-evaluate``."""
    sys.argv = [sys.argv[0], *listify_ref(sys.argv[1:])]
    run_hydra(_app)


if __name__ == "__main__":
    main()
