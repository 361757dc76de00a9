"""The records and the report of ``scripts/gpu_check.sh``.

    python scripts/gpu_report.py record STEPS_DIR NAME --rc RC --seconds S --limit L \\
        --log LOG [--result JSON] [--command TEXT]
    python scripts/gpu_report.py write STEPS_DIR OUT_DIR [--context JSON]
    python scripts/gpu_report.py run RUN_DIR OUT_JSON

``record`` keeps one step's outcome (exit code, time, the figures it wrote, the end of
its log) as ``STEPS_DIR/NAME.json``; ``run`` sums up a training run directory (its last
training and validation records, the process group's backend) as figures; ``write``
gathers every step into ``OUT_DIR/gpu_report.json`` and a readable ``OUT_DIR/summary.md``.
Steps are kept in the order they ran. A step's status: ``passed`` (exit 0), ``timed out``
(124 or 137, what ``timeout`` returns), ``skipped`` (rc -1: no time was left), else
``failed``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

TAIL_LINES = 30
TIMED_OUT = (124, 137)


def status(rc: int) -> str:
    if rc == 0:
        return "passed"
    if rc in TIMED_OUT:
        return "timed out"
    return "skipped" if rc == -1 else "failed"


def _tail(log: Path) -> list[str]:
    if not log.is_file():
        return []
    return log.read_text(errors="replace").splitlines()[-TAIL_LINES:]


def _result(path: Path | None) -> Any:
    """The step's own JSON figures, or None when it wrote none (or not whole)."""
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def record(args: argparse.Namespace) -> None:
    steps = Path(args.steps)
    steps.mkdir(parents=True, exist_ok=True)
    order = len(list(steps.glob("*.json")))
    entry = {
        "name": args.name,
        "order": order,
        "status": status(args.rc),
        "rc": args.rc,
        "seconds": round(args.seconds, 1),
        "limit_s": args.limit,
        "command": args.command,
        "log": str(args.log),
        "result": _result(args.result),
        "log_tail": _tail(Path(args.log)),
    }
    (steps / f"{args.name}.json").write_text(json.dumps(entry, indent=2) + "\n")


def pytest_counts(lines: list[str]) -> dict[str, int]:
    """Counts from pytest's last summary line (``3 failed, 120 passed in 9.1s``)."""
    for line in reversed(lines):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", line)
        if found and " in " in line:
            return {("error" if kind.startswith("error") else kind): int(n) for n, kind in found}
    return {}


def gather(steps_dir: Path, context: dict[str, Any]) -> dict[str, Any]:
    """The whole report: context, every step in order, and whether all passed."""
    entries = [json.loads(p.read_text()) for p in steps_dir.glob("*.json")]
    entries.sort(key=lambda e: e["order"])
    for entry in entries:
        if entry["name"] == "tests":
            entry["counts"] = pytest_counts(entry["log_tail"])
    steps = {e.pop("name"): e for e in entries}
    for entry in steps.values():
        entry.pop("order")
    return {
        **context,
        "ok": bool(steps) and all(e["status"] == "passed" for e in steps.values()),
        "steps": steps,
    }


def _figure(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        value = f"{value:,.3g}" if abs(value) < 10 else f"{value:,.0f}"
    elif isinstance(value, int):
        value = f"{value:,}"
    return f"{value}{unit}"


def _equivalence_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        f"- outputs agree within tolerances: **{result['ok']}** (tolerances: "
        + ", ".join(f"{k} {v}" for k, v in result["tolerances"].items())
        + ")"
    ]
    for name, v in result["variants"].items():
        search = ", ".join(
            f"{s}: {r['same_tokens']}/{r['sentences']} same" for s, r in v["search"].items()
        )
        lines.append(
            f"- {name}: loss rel. error {v['loss_rel_error']:.2g}, gradients "
            f"{v['max_grad_rel_error']:.2g}, bf16 loss {v['bf16_loss_rel_error']:.2g}; {search}"
            + (f" — FAILED: {', '.join(v['failed'])}" if v["failed"] else "")
        )
    timing = result.get("timing")
    if timing:
        per = ", ".join(f"{k} {1e3 * s:.2f} ms" for k, s in timing["step_seconds"].items())
        lines.append(f"- one training step per recurrence: {per}; faster: **{timing['faster']}**")
    return lines


def _figures(steps: dict[str, Any]) -> list[str]:
    """The measured figures, one line each, for the steps that produced them."""
    lines: list[str] = []
    eq = steps.get("equivalence", {}).get("result")
    if eq:
        lines += ["", "## CUDA against CPU", "", *_equivalence_lines(eq)]
    names = ("train_fp32", "train_bf16")
    train = [steps[n]["result"] for n in names if steps.get(n, {}).get("result")]
    if train:
        lines += ["", "## Training (multi30k_en_de_25min)", ""]
        for r in train:
            lines.append(
                f"- {r['precision']}: {_figure(r['train_tgt_tokens_per_s'])} target tokens/s over "
                f"{r['steps']} steps ({_figure(r.get('seconds'))} s), "
                f"{_figure(r['fraction_of_bf16_peak'])} of the bf16 matmul peak"
            )
    run = steps.get("torchrun", {}).get("result")
    if run and run["train"]:
        lines += ["", "## torchrun, one GPU", ""]
        lines.append(
            f"- backend {run['backend']}, step {run['train']['step']}: loss "
            f"{run['train']['loss']:.3f}, {_figure(run['train']['tokens_per_s'])} target tokens/s;"
            f" bundles: {', '.join(run['bundles']) or 'none'}"
        )
    decode = steps.get("decode", {}).get("result")
    if decode:
        lines += [
            "",
            "## Decoding (test_2016_flickr)",
            "",
            "The torchrun step's 50-step model: a speed of search, not of a trained model's"
            " translations (an untrained model's outputs run long).",
            "",
            "| search | batch | sentences/s |",
        ]
        lines.append("| --- | --- | --- |")
        for r in decode:
            lines.append(f"| {r['search']} | {r['batch_size']} | {_figure(r['sentences_per_s'])} |")
    return lines


def summary(report: dict[str, Any]) -> str:
    """The report as Markdown: a table of steps, then the figures."""
    lines = ["# GPU check", ""]
    for key in ("device", "torch", "finished", "commit"):
        if key in report:
            lines.append(f"- {key}: {report[key]}")
    lines += ["", f"All steps passed: **{report['ok']}**", ""]
    lines += ["| step | status | seconds | limit |", "| --- | --- | --- | --- |"]
    for name, step in report["steps"].items():
        note = status_note(name, step)
        lines.append(f"| {name} | {step['status']}{note} | {step['seconds']} | {step['limit_s']} |")
    lines += _figures(report["steps"])
    failed = [n for n, s in report["steps"].items() if s["status"] in ("failed", "timed out")]
    for name in failed:
        tail = report["steps"][name]["log_tail"][-10:]
        lines += ["", f"## {name}: end of its log", "", "```", *tail, "```"]
    return "\n".join(lines) + "\n"


def status_note(name: str, step: dict[str, Any]) -> str:
    counts = step.get("counts")
    if name == "tests" and counts:
        return " (" + ", ".join(f"{n} {k}" for k, n in counts.items()) + ")"
    return ""


def run_figures(run_dir: Path) -> dict[str, Any]:
    """A training run's last training and validation records and its backend."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = {kind: [r for r in records if r["kind"] == kind][-1:] for kind in ("train", "valid")}
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").is_file() else ""
    backend = re.search(r"backend (\w+)", log)
    return {
        "train": last["train"][0] if last["train"] else None,
        "valid": last["valid"][0] if last["valid"] else None,
        "backend": backend.group(1) if backend else None,
        "bundles": sorted(
            p.name
            for p in run_dir.iterdir()
            if not p.name.startswith(".") and (p / "config.yaml").is_file()
        ),
    }


def write(args: argparse.Namespace) -> None:
    context = json.loads(args.context) if args.context else {}
    report = gather(Path(args.steps), context)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "summary.md").write_text(summary(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("steps")
    rec.add_argument("name")
    rec.add_argument("--rc", type=int, required=True)
    rec.add_argument("--seconds", type=float, required=True)
    rec.add_argument("--limit", type=int, required=True)
    rec.add_argument("--log", required=True)
    rec.add_argument("--result", type=Path, default=None)
    rec.add_argument("--command", default="")
    wr = sub.add_parser("write")
    wr.add_argument("steps")
    wr.add_argument("out")
    wr.add_argument("--context", default=None, help="JSON object of facts about the run")
    figures = sub.add_parser("run")
    figures.add_argument("run_dir", type=Path)
    figures.add_argument("out", type=Path)
    args = parser.parse_args()
    try:
        if args.verb == "record":
            record(args)
        elif args.verb == "write":
            write(args)
        else:
            args.out.write_text(json.dumps(run_figures(args.run_dir), indent=2) + "\n")
    except (OSError, json.JSONDecodeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
