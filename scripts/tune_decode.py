"""Pick beam size and length penalty on a development set, never on the test set.

    python scripts/tune_decode.py --bundle runs/m30k/best \
        --src $SEQ2SEQ_MULTI30K/val.en.gz --ref $SEQ2SEQ_MULTI30K/val.de.gz \
        --beams 5 8 12 --alphas 0.6 1.0 1.4 --json tune.json

Loads the bundle once and translates the development set for every
(beam, alpha) pair, printing cased sacreBLEU and chrF for each and the best
pair by BLEU. Alpha is the GNMT length-penalty exponent (0 ranks hypotheses by
raw log-probability); with beam 1 it has no effect, so greedy is run once.
The chosen pair is then passed to ``seq2seq-translate`` / ``seq2seq-evaluate``
as ``decode.beam_size=`` and ``decode.alpha=``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from seq2seq.data.text import read_lines
from seq2seq.decoding.translator import Translator
from seq2seq.metrics import corpus_scores


def grid(beams: list[int], alphas: list[float]) -> list[tuple[int, float]]:
    """Every (beam, alpha) pair, with greedy (beam 1) once, at alpha 0."""
    pairs = [(1, 0.0)] if 1 in beams else []
    pairs += [(b, a) for b in beams if b > 1 for a in alphas]
    return pairs


def tune(
    translator: Translator, src: list[str], ref: list[str], pairs: list[tuple[int, float]]
) -> list[dict[str, float]]:
    """BLEU, chrF and time of every pair on ``src``/``ref``, in grid order."""
    rows = []
    for beam, alpha in pairs:
        start = time.perf_counter()
        hyps = translator.with_decode(beam_size=beam, alpha=alpha, nbest=1).translate(src)
        seconds = time.perf_counter() - start
        scores = {s.name: s.score for s in corpus_scores(hyps, [ref])}
        rows.append(
            {
                "beam": beam,
                "alpha": alpha,
                "bleu": round(scores["BLEU"], 2),
                "chrf": round(scores["chrF2"], 2),
                "seconds": round(seconds, 1),
            }
        )
        print(
            f"beam {beam:>3}  alpha {alpha:4.2f}  BLEU {rows[-1]['bleu']:6.2f}  "
            f"chrF {rows[-1]['chrf']:6.2f}  ({seconds:.1f}s)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--src", required=True, help="development source file")
    parser.add_argument("--ref", required=True, help="its reference translations")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.6, 1.0, 1.4])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write every row and the best pair here")
    args = parser.parse_args()

    src, ref = read_lines(args.src), read_lines(args.ref)
    if len(src) != len(ref):
        raise SystemExit(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)}")
    translator = Translator.from_bundle(args.bundle, device=args.device).with_decode(
        batch_size=args.batch_size
    )
    rows = tune(translator, src, ref, grid(args.beams, args.alphas))
    best = max(rows, key=lambda r: r["bleu"])
    print(
        f"best on {Path(args.src).name}: beam {best['beam']}, alpha {best['alpha']} "
        f"(BLEU {best['bleu']})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "best": best}, indent=2) + "\n")


if __name__ == "__main__":
    main()
