"""Translate lines with a trained model: the code path shared by the CLI,
the Python API and validation during training.

Contract: exactly one result per input line, in input order. An empty or
whitespace-only line gives an empty result without a model call; a line longer
than ``decode.max_input_tokens`` pieces is truncated (with a warning naming the
line), never dropped.

Why sort: sentences are sorted by length before batching (little padding, fewer
steps) and results are put back in input order, so callers never see the
sorting. Search computes every sentence independently of its batch-mates, so
neither the sorting nor ``decode.batch_size`` changes any output.

Why chunks: `Translator.translate_stream` reads ``chunk_size`` lines at a time,
so memory stays constant on inputs of any size while sorting still has enough
lines to batch well.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from seq2seq.config import DecodeConfig, validate
from seq2seq.data.batching import pad
from seq2seq.data.tokenizer import BOS_ID, EOS_ID, Tokenizer
from seq2seq.decoding import inference
from seq2seq.decoding.beam import beam_search
from seq2seq.decoding.ensemble import for_search
from seq2seq.decoding.live import LiveBeam, LiveGreedy, LiveSettings, live_search
from seq2seq.decoding.search import Hypothesis, Searchable, greedy
from seq2seq.model import bundle as bundle_io
from seq2seq.model.ensemble import Ensemble
from seq2seq.model.model import Seq2Seq
from seq2seq.runtime.device import pick_device, use_bf16

__all__ = ["TextHypothesis", "Translator", "check_decode"]

logger = logging.getLogger(__name__)


@contextmanager
def _batch_workers(count: int) -> Iterator[Callable[..., Iterator[Any]]]:
    """A ``map`` that runs ``count`` batches at once, each thread with its share of
    the intra-op threads (restored afterwards).

    Why: a search step is many small operations (tens to hundreds of rows), which
    use several cores poorly; batches side by side, one core each, search faster
    than one batch on all cores. Each batch's search is unchanged, so outputs are too.
    """
    if count <= 1:
        yield map
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // count))
    try:
        with ThreadPoolExecutor(count) as pool:
            yield pool.map
    finally:
        torch.set_num_threads(threads)


def check_decode(decode: DecodeConfig) -> None:
    """Fail before any input is read when decoding settings cannot work together
    (the ranges and rules live with the schema, in `seq2seq.config`)."""
    validate(decode, "decode")


@dataclass(frozen=True)
class TextHypothesis:
    """One translation of one input line, with what alignment output needs.

    Attributes:
        text: the detokenised translation.
        score: the ranking score (length-normalised log-prob for beam search, raw
            log-prob for greedy).
        log_prob: total log-prob of the tokens followed by EOS.
        tokens: target ids without BOS and EOS.
        src_pieces: the (possibly truncated) source pieces the model saw.
        tgt_pieces: target pieces of ``tokens`` followed by the EOS piece, one per
            attention row.
        attention: (len(tgt_pieces), len(src_pieces)) on CPU, or None unless requested.
    """

    text: str
    score: float
    log_prob: float
    tokens: tuple[int, ...]
    src_pieces: tuple[str, ...]
    tgt_pieces: tuple[str, ...]
    attention: Tensor | None = None


class Translator:
    """A model, its tokenizer and decoding settings, ready to translate.

    Search reads the model through an inference object built here, once, from the
    weights as they are (``seq2seq.decoding.inference``): build a new translator after the
    weights change.
    """

    def __init__(
        self,
        model: Seq2Seq | Ensemble,
        tokenizer: Tokenizer,
        decode: DecodeConfig,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        check_decode(decode)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decode = decode
        self.device = torch.device(device)
        self.searched: Searchable = (
            for_search(model) if isinstance(model, Ensemble) else inference.build(model)
        )

    @classmethod
    def from_bundle(
        cls, path: str | Path, *, decode: DecodeConfig | None = None, device: str = "auto"
    ) -> Translator:
        """Load a bundle; decoding settings default to the ones it was trained with."""
        dev = pick_device(device)
        loaded = bundle_io.load(path, device=dev)
        return cls(loaded.model, loaded.tokenizer, decode or loaded.config.decode, device=dev)

    def with_decode(self, **changes: Any) -> Translator:
        """A translator sharing this model (and its inference object) with some
        decoding settings changed.

        Args:
            changes: `DecodeConfig` fields and their new values, e.g. ``beam_size=1``.
        """
        decode = replace(self.decode, **changes)
        check_decode(decode)
        changed = copy.copy(self)
        changed.decode = decode
        return changed

    # ------------------------------------------------------------------ text in, text out

    def translate(self, lines: Sequence[str]) -> list[str]:
        """Best translation per line, detokenised, in input order."""
        return [hyps[0].text if hyps else "" for hyps in self.hypotheses(lines)]

    def hypotheses(
        self, lines: Sequence[str], *, attention: bool = False
    ) -> list[list[TextHypothesis]]:
        """The n-best list per line, best first, in input order; empty lines give ``[]``."""
        return self._hypotheses(lines, first_line=1, attention=attention)

    def translate_stream(
        self, lines: Iterable[str], *, chunk_size: int, attention: bool = False
    ) -> Iterator[list[TextHypothesis]]:
        """Like `hypotheses`, for inputs of any size: one n-best list per line, lazily.

        Reads ``chunk_size`` lines, translates them (sorted by length inside the
        chunk), yields their results in input order, and repeats; memory stays
        bounded by one chunk. Outputs equal one `hypotheses` call on all lines.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size}; it must be at least 1")
        it = iter(lines)
        first_line = 1
        while chunk := list(itertools.islice(it, chunk_size)):
            yield from self._hypotheses(chunk, first_line=first_line, attention=attention)
            first_line += len(chunk)

    def _hypotheses(
        self, lines: Sequence[str], *, first_line: int, attention: bool
    ) -> list[list[TextHypothesis]]:
        """`hypotheses` with line numbers counted from ``first_line`` in warnings."""
        src_ids = self.source_ids(lines, first_line=first_line)
        found = self.search_ids(src_ids, attention=attention)
        return [
            self.texts(line, ids, hyps)
            for line, ids, hyps in zip(lines, src_ids, found, strict=True)
        ]

    def source_ids(self, lines: Sequence[str], *, first_line: int = 1) -> list[list[int]]:
        """The source ids search reads for each line: stripped, tokenized, truncated."""
        stripped = [line.strip() for line in lines]
        return self._truncate(self.tokenizer.encode_src(stripped), first_line)

    def texts(
        self, line: str, ids: Sequence[int], hyps: Sequence[Hypothesis]
    ) -> list[TextHypothesis]:
        """The hypotheses search found for ``line`` (read as ``ids``), as text."""
        if not hyps:
            return []
        src_pieces = tuple(self.tokenizer.src_pieces(line.strip())[: len(ids)])
        return [self._to_text(h, src_pieces) for h in hyps]

    def _truncate(self, src_ids: list[list[int]], first_line: int) -> list[list[int]]:
        limit = self.decode.max_input_tokens
        for i, ids in enumerate(src_ids):
            if limit and len(ids) > limit:
                logger.warning(
                    "input line %d has %d pieces; truncated to decode.max_input_tokens=%d",
                    first_line + i,
                    len(ids),
                    limit,
                )
                src_ids[i] = ids[:limit]
        return src_ids

    def _to_text(self, hyp: Hypothesis, src_pieces: tuple[str, ...]) -> TextHypothesis:
        return TextHypothesis(
            text=self.tokenizer.decode_tgt([hyp.tokens])[0].replace("\n", " "),
            score=hyp.score,
            log_prob=hyp.log_prob,
            tokens=tuple(hyp.tokens),
            src_pieces=src_pieces,
            tgt_pieces=tuple(self.tokenizer.tgt_pieces([*hyp.tokens, EOS_ID])),
            attention=hyp.attention,
        )

    # ------------------------------------------------------------------------ ids in, ids out

    def search_ids(
        self, src_ids: Sequence[Sequence[int]], *, attention: bool = False
    ) -> list[list[Hypothesis]]:
        """Search over id sequences, batched by length; empty inputs give ``[]``.

        Args:
            src_ids: source piece ids per sentence, without BOS/EOS, not truncated here.
            attention: also return each hypothesis' attention rows.
        """
        results: list[list[Hypothesis]] = [[] for _ in src_ids]
        order = sorted((i for i, s in enumerate(src_ids) if s), key=lambda i: len(src_ids[i]))
        size = self.decode.batch_size
        batches = [order[start : start + size] for start in range(0, len(order), size)]
        self.model.eval()

        def search(batch: list[int]) -> list[list[Hypothesis]]:
            src, lengths = pad([src_ids[i] for i in batch])
            with self._search_mode():
                return self._search(src.to(self.device), lengths.to(self.device), attention)

        with _batch_workers(self._workers(len(batches))) as run:
            for batch, hyps in zip(batches, run(search, batches), strict=True):
                for i, h in zip(batch, hyps, strict=True):
                    results[i] = h
        return results

    def live(self, *, attention: bool) -> LiveGreedy[Any] | LiveBeam[Any]:
        """An empty live batch with these decoding settings, which sentences join and
        leave step by step (`seq2seq.decoding.live`); run its calls in `search_mode`."""
        d = self.decode
        settings = LiveSettings(
            beam_size=d.beam_size,
            nbest=d.nbest,
            alpha=d.alpha,
            max_len_a=d.max_len_a,
            max_len_b=d.max_len_b,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            attention=attention,
        )
        self.model.eval()
        return live_search(self.searched, settings, self.device)

    def search_mode(self) -> contextlib.AbstractContextManager[None]:
        """The autograd and precision mode search runs in, for this thread."""
        return self._search_mode()

    @contextmanager
    def _search_mode(self) -> Iterator[None]:
        """No autograd, and bf16 autocast if ``decode.precision`` asks for it; per
        thread, as both are thread-local."""
        bf16 = use_bf16(self.decode.precision, self.device)
        # no_grad, not inference_mode: autocast keeps its bf16 copies of the weights
        # only outside inference mode; inside it, every step re-cast every weight.
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            yield

    def _workers(self, batches: int) -> int:
        """How many batches to search at once: ``decode.workers``, or on CPU one per
        intra-op thread (never more than there are batches)."""
        wanted = self.decode.workers
        if wanted == 0:
            wanted = torch.get_num_threads() if self.device.type == "cpu" else 1
        return max(1, min(wanted, batches))

    def _search(self, src: Tensor, lengths: Tensor, attention: bool) -> list[list[Hypothesis]]:
        """One padded batch through greedy (beam 1, 1-best: the fast path) or beam search.

        Args:
            src: (B, S) long, padded.
            lengths: (B,) long.
        """
        d = self.decode
        if d.beam_size == 1 and d.nbest == 1:
            return greedy(
                self.searched,
                src,
                lengths,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                max_len_a=d.max_len_a,
                max_len_b=d.max_len_b,
                return_attention=attention,
            )
        return beam_search(
            self.searched,
            src,
            lengths,
            beam_size=d.beam_size,
            nbest=d.nbest,
            alpha=d.alpha,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            max_len_a=d.max_len_a,
            max_len_b=d.max_len_b,
            return_attention=attention,
        )
