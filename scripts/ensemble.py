"""Combine trained bundles into one ensemble bundle that translates and evaluates
like a single model (``seq2seq-translate model=OUT``, ``seq2seq-evaluate``).

    python scripts/ensemble.py --out runs/ens runs/a/best runs/b/best

Members must share their SentencePiece models (train them on the same data with
the same tokenizer settings); each is copied, so the result is self-contained.
"""

from __future__ import annotations

import argparse

from seq2seq.model.bundle import save_ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("members", nargs="+", help="member bundle directories (at least 2)")
    parser.add_argument("--out", required=True, help="the ensemble bundle to write")
    args = parser.parse_args()
    print(save_ensemble(args.out, args.members))


if __name__ == "__main__":
    main()
