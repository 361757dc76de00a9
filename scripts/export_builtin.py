"""Write the built-in corpus to plain-text files, to look at or to use elsewhere.

    python scripts/export_builtin.py OUT_DIR [--tgt-lang de] [--seed 1]

Writes ``OUT_DIR/{train,valid,test}.{en,<tgt>}``, one sentence per line, aligned
by line: exactly the pairs ``seq2seq-train`` (data=builtin) trains and validates on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from seq2seq.config import BuiltinConfig
from seq2seq.data.builtin import make_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--src-lang", default="en")
    parser.add_argument("--tgt-lang", default="de")
    parser.add_argument("--seed", type=int, default=BuiltinConfig.seed)
    parser.add_argument("--train-size", type=int, default=BuiltinConfig.train_size)
    parser.add_argument("--valid-size", type=int, default=BuiltinConfig.valid_size)
    parser.add_argument("--test-size", type=int, default=BuiltinConfig.test_size)
    args = parser.parse_args()
    cfg = BuiltinConfig(args.train_size, args.valid_size, args.test_size, args.seed)
    splits = make_splits(cfg, src_lang=args.src_lang, tgt_lang=args.tgt_lang)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, pairs in splits.items():
        for side, lang in enumerate((args.src_lang, args.tgt_lang)):
            text = "".join(pair[side] + "\n" for pair in pairs)
            (args.out_dir / f"{split}.{lang}").write_text(text, encoding="utf-8")
        print(f"{split}: {len(pairs)} pairs")


if __name__ == "__main__":
    main()
