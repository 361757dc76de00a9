"""A device against the CPU on a tiny seeded model: one training step, greedy and beam search;
then both recurrence implementations timed on the device.

    python scripts/gpu_equivalence.py [--device cuda] [--json report.json]

The reference is the CPU running the hand-written recurrence in fp32. Each candidate is
the device under test running one recurrence implementation (``model.rnn_impl``), so on
a CPU (``--device cpu``) the check still compares two code paths. TF32 is off while it
runs, so fp32 means fp32 on both sides. The tolerances (``TOLERANCES``):

* the summed loss of one teacher-forced batch: relative 1e-5;
* every parameter's gradient: ``max |a - b| <= 1e-4 * max |b|`` per tensor (a sum
  taken in another order moves small entries by more than 1e-4 of themselves; the
  tensor's own scale is what an optimiser step sees);
* the same batch under bf16 autocast on the device against the fp32 reference: loss
  relative 2e-2 (bf16 keeps 8 bits of mantissa);
* greedy and beam 5: the same tokens for every sentence, and scores (summed log-probs)
  within ``1e-4 * max(1, |score|)``.

The weights are scaled up so that every arg-max is decisive: a near tie broken one
way on one device and the other way on another would say nothing about either.

Timing: one forward and backward of a Multi30k-sized model (``--time-*``) per
implementation, the median of ``--time-steps`` after a warm-up, synchronised on the
device. Nothing here asserts a speed; the exit code says only whether the outputs agreed
(0 yes, 1 no, 2 the device is absent).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from seq2seq.config import ModelConfig, RnnImpl
from seq2seq.decoding import inference
from seq2seq.decoding.beam import beam_search
from seq2seq.decoding.search import greedy
from seq2seq.model.model import Seq2Seq

TOLERANCES = {
    "loss_rtol": 1e-5,
    "grad_rel_to_max": 1e-4,
    "bf16_loss_rtol": 2e-2,
    "score_rtol": 1e-4,
}
PAD, BOS, EOS = 0, 1, 2
SRC_VOCAB, TGT_VOCAB = 50, 60
SRC_LEN, TGT_LEN = 12, 10
VARIANTS = {"full softmax": 0, "two-level softmax": 20}
IMPLS = (RnnImpl.handwritten, RnnImpl.torch)


@contextmanager
def no_tf32() -> Iterator[None]:
    """Matmuls and cuDNN calls in full fp32 while it lasts."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_model(impl: RnnImpl, head: int, device: torch.device) -> Seq2Seq:
    """The same weights on every device: built and scaled on the CPU, then moved."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        embedding_size=16,
        hidden_size=32,
        attention_size=16,
        dropout=0.0,
        softmax_head=head,
        rnn_impl=impl,
    )
    model = Seq2Seq(cfg, src_vocab=SRC_VOCAB, tgt_vocab=TGT_VOCAB, pad_id=PAD)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)
    return model.to(device)


def tiny_batch(sentences: int = 24) -> dict[str, torch.Tensor]:
    """A seeded batch of varied lengths on the CPU: sources, and targets as the
    decoder reads them (BOS first) and as the loss scores them (EOS last)."""
    gen = torch.Generator().manual_seed(1)
    src_lengths = torch.randint(1, SRC_LEN + 1, (sentences,), generator=gen)
    src_lengths[0] = SRC_LEN
    src = torch.randint(3, SRC_VOCAB, (sentences, SRC_LEN), generator=gen)
    src[torch.arange(SRC_LEN)[None] >= src_lengths[:, None]] = PAD
    tgt_lengths = torch.randint(1, TGT_LEN, (sentences,), generator=gen)  # tokens before EOS
    tokens = torch.randint(3, TGT_VOCAB, (sentences, TGT_LEN), generator=gen)
    positions = torch.arange(TGT_LEN)[None]
    tgt_out = tokens.masked_fill(positions == tgt_lengths[:, None], EOS)
    tgt_out = tgt_out.masked_fill(positions > tgt_lengths[:, None], PAD)
    tgt_in = torch.cat([torch.full((sentences, 1), BOS), tokens[:, :-1]], dim=1)
    tgt_in = tgt_in.masked_fill(positions > tgt_lengths[:, None], PAD)
    return {"src": src, "lengths": src_lengths, "tgt_in": tgt_in, "tgt_out": tgt_out}


def run(model: Seq2Seq, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """Loss and gradients of one training batch (and its bf16-autocast loss), then the
    greedy and beam-5 outputs of the same sources; every result on the CPU."""
    b = {k: v.to(device) for k, v in batch.items()}
    model.train()
    loss, _ = model.loss(b["src"], b["lengths"], b["tgt_in"], b["tgt_out"], label_smoothing=0.1)
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        bf16_loss, _ = model.loss(
            b["src"], b["lengths"], b["tgt_in"], b["tgt_out"], label_smoothing=0.1
        )
    model.eval()
    searched = inference.build(model)
    budget = {"bos_id": BOS, "eos_id": EOS, "max_len_a": 1.5, "max_len_b": 4}
    found = {
        "greedy": greedy(searched, b["src"], b["lengths"], **budget),
        "beam5": beam_search(searched, b["src"], b["lengths"], beam_size=5, **budget),
    }
    return {
        "loss": float(loss.detach()),
        "bf16_loss": float(bf16_loss),
        "grads": grads,
        "search": {
            name: [(hyps[0].tokens, hyps[0].score) for hyps in found[name]] for name in found
        },
    }


def compare(reference: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """How far ``got`` is from ``reference``, and whether within ``TOLERANCES``."""
    t = TOLERANCES
    scale = max(abs(reference["loss"]), 1e-12)
    loss_error = abs(got["loss"] - reference["loss"]) / scale
    bf16_error = abs(got["bf16_loss"] - reference["loss"]) / scale
    worst_grad = 0.0
    for name, ref in reference["grads"].items():
        if name in got["grads"]:
            error = (got["grads"][name] - ref).abs().max() / max(float(ref.abs().max()), 1e-12)
            worst_grad = max(worst_grad, float(error))
    same_params = got["grads"].keys() == reference["grads"].keys()
    search: dict[str, Any] = {}
    for name, ref_hyps in reference["search"].items():
        pairs = list(zip(ref_hyps, got["search"][name], strict=True))
        same = sum(a[0] == b[0] for a, b in pairs)
        score_error = max(abs(a[1] - b[1]) / max(1.0, abs(a[1])) for a, b in pairs)
        search[name] = {
            "sentences": len(pairs),
            "same_tokens": same,
            "max_score_rel_error": score_error,
            "ok": same == len(pairs) and score_error <= t["score_rtol"],
        }
    checks = {
        "loss": loss_error <= t["loss_rtol"],
        "grads": same_params and worst_grad <= t["grad_rel_to_max"],
        "bf16_loss": bf16_error <= t["bf16_loss_rtol"],
        **{name: s["ok"] for name, s in search.items()},
    }
    return {
        "ok": all(checks.values()),
        "failed": [name for name, ok in checks.items() if not ok],
        "loss_rel_error": loss_error,
        "max_grad_rel_error": worst_grad,
        "bf16_loss_rel_error": bf16_error,
        "search": search,
    }


def check(device: torch.device) -> dict[str, Any]:
    """Every softmax variant and recurrence implementation on ``device`` against the
    CPU's hand-written fp32 reference."""
    batch = tiny_batch()
    cpu = torch.device("cpu")
    variants: dict[str, Any] = {}
    with no_tf32():
        for variant, head in VARIANTS.items():
            reference = run(tiny_model(RnnImpl.handwritten, head, cpu), batch, cpu)
            for impl in IMPLS:
                got = run(tiny_model(impl, head, device), batch, device)
                variants[f"{variant}, {impl.value}"] = compare(reference, got)
    return {"ok": all(v["ok"] for v in variants.values()), "variants": variants}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_impls(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of one forward and backward per implementation, and the faster one."""
    gen = torch.Generator().manual_seed(2)
    shape = (args.time_batch, args.time_length)
    src = torch.randint(3, args.time_vocab, shape, generator=gen).to(device)
    tgt = torch.randint(3, args.time_vocab, shape, generator=gen).to(device)
    lengths = torch.full((args.time_batch,), args.time_length, device=device)
    medians = {}
    for impl in IMPLS:
        torch.manual_seed(0)
        cfg = ModelConfig(
            embedding_size=args.time_hidden // 2,
            hidden_size=args.time_hidden,
            attention_size=args.time_hidden // 2,
            softmax_head=args.time_head,
            rnn_impl=impl,
        )
        model = Seq2Seq(cfg, src_vocab=args.time_vocab, tgt_vocab=args.time_vocab, pad_id=PAD)
        model.to(device).train()
        times = []
        for step in range(args.time_warmup + args.time_steps):
            _sync(device)
            start = time.perf_counter()
            loss, _ = model.loss(src, lengths, tgt, tgt)
            loss.backward()
            _sync(device)
            if step >= args.time_warmup:
                times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        medians[impl.value] = statistics.median(times)
    return {
        "step_seconds": medians,
        "faster": min(medians, key=medians.__getitem__),
        "setup": {k: v for k, v in vars(args).items() if k.startswith("time_")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the device under test (cpu: CPU vs CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--time-steps", type=int, default=20, help="timed steps per implementation")
    parser.add_argument("--time-warmup", type=int, default=5)
    parser.add_argument("--time-batch", type=int, default=64)
    parser.add_argument("--time-length", type=int, default=16, help="source and target tokens")
    parser.add_argument("--time-hidden", type=int, default=512)
    parser.add_argument("--time-vocab", type=int, default=8000)
    parser.add_argument("--time-head", type=int, default=2000, help="two-level softmax head")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} but CUDA is not available", file=sys.stderr)
        sys.exit(2)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "reference": "cpu, handwritten recurrence, fp32",
        "torch": torch.__version__,
        "tolerances": TOLERANCES,
        **check(device),
    }
    report["timing"] = time_impls(device, args) if args.time_steps > 0 else None
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
