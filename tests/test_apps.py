"""End to end: ``seq2seq-translate`` and ``seq2seq-evaluate`` on files, stdin and bundles.

Most runs call the app's ``main()`` in this process (fast); a few run
``python -m seq2seq.<app>`` in a subprocess where the process boundary is the point:
exit codes, what reaches stdout, files left in the working directory.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
from omegaconf import OmegaConf

from seq2seq import evaluate, train, translate
from seq2seq.config import DecodeConfig, ModelConfig, TrainApp
from seq2seq.decoding import plotting
from seq2seq.decoding.translator import Translator
from seq2seq.model import bundle
from tests.helpers import checkout_env, lively_model, one_error_line

LIMIT = 30  # decode.max_input_tokens passed to the CLI


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tokenizer):
    """The tiny model with weights scaled up so that different inputs translate differently."""
    return lively_model(tokenizer)


@pytest.fixture(scope="module")
def bundle_dir(model, tokenizer, tmp_path_factory) -> Path:
    """A bundle whose own decode settings (n-best 2) the CLI must ignore."""
    config = TrainApp(
        model=ModelConfig(embedding_size=8, hidden_size=16, attention_size=8, dropout=0.0),
        decode=DecodeConfig(beam_size=2, nbest=2),
        run_dir="x",
    )
    path = tmp_path_factory.mktemp("bundle") / "model"
    return bundle.save(path, model=model, config=config, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def lines(pairs, tokenizer) -> list[str]:
    """Inputs with an empty, a whitespace-only, duplicate, non-ASCII and an overlong line."""
    a, b, c = pairs[0][0], pairs[1][0], pairs[2][0]
    long = " ".join(s for s, _ in pairs[:12])
    assert len(tokenizer.encode_src([long])[0]) > LIMIT
    return [a, "", b, a, "   ", long, "Ünïcödé € 12", c, b]


def expected(model, tokenizer, lines, **decode) -> list[str]:
    settings = {"beam_size": 2, "max_input_tokens": LIMIT, **decode}
    return Translator(model, tokenizer, DecodeConfig(**settings)).translate(lines)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


BASE = ["decode.beam_size=2", f"decode.max_input_tokens={LIMIT}"]


# ------------------------------------------------------------------------------ runners


def cli(app: str, *args: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m seq2seq.<app>`` from ``cwd`` against this checkout."""
    return subprocess.run(
        [sys.executable, "-m", f"seq2seq.{app}", *args],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env=checkout_env(),
        timeout=300,
    )


# ---------------------------------------------------------------------------- translate


@pytest.mark.slow
def test_translate_keeps_line_count_and_order(
    run_app, bundle_dir, model, tokenizer, lines, tmp_path
):
    src = write_lines(tmp_path / "in.txt", lines)
    out = tmp_path / "sub" / "out.txt"
    code, stdout, stderr = run_app(
        translate.main, f"model={bundle_dir}", f"input={src}", f"output={out}", *BASE
    )
    assert code == 0, stderr
    assert stdout == ""
    got = read_lines(out)
    assert got == expected(model, tokenizer, lines)  # one line each, bundle's n-best ignored
    assert got[1] == got[4] == ""
    assert got[0] == got[3] and got[2] == got[8]
    assert "input line 6 has" in stderr  # the overlong line was truncated, not dropped


@pytest.mark.slow
def test_translate_stdin_to_stdout_prints_only_translations(
    bundle_dir, model, tokenizer, lines, tmp_path
):
    data = "".join(line + "\n" for line in lines).encode()
    result = cli("translate", f"model={bundle_dir}", *BASE, "threads=1", cwd=tmp_path, stdin=data)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "".join(t + "\n" for t in expected(model, tokenizer, lines))
    assert list(tmp_path.iterdir()) == []  # no translate.log, no .hydra/, no outputs/


@pytest.mark.slow
def test_translate_reads_gzip(run_app, bundle_dir, model, tokenizer, lines, tmp_path):
    src = tmp_path / "in.txt.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    code, stdout, stderr = run_app(translate.main, f"model={bundle_dir}", f"input={src}", *BASE)
    assert code == 0, stderr
    assert stdout.splitlines() == expected(model, tokenizer, lines)


@pytest.mark.slow
def test_invalid_utf8_fails_naming_the_line(bundle_dir, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"one\ntwo\nbad \xff\xfe byte\nfour\n")
    result = cli("translate", f"model={bundle_dir}", "input=in.txt", *BASE, cwd=tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "in.txt:3: not valid UTF-8" in stderr and "errors=replace" in stderr
    assert "Traceback" not in stderr
    assert result.stdout == b""


@pytest.mark.slow
def test_errors_replace_translates_invalid_bytes(run_app, bundle_dir, model, tokenizer, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"one\nbad \xff byte\n\nfour\n")
    code, stdout, stderr = run_app(
        translate.main,
        f"model={bundle_dir}",
        f"input={tmp_path / 'in.txt'}",
        "errors=replace",
        *BASE,
    )
    assert code == 0, stderr
    assert stdout.splitlines() == expected(model, tokenizer, ["one", "bad \ufffd byte", "", "four"])


@pytest.mark.slow
def test_scores_format(run_app, bundle_dir, model, tokenizer, lines, tmp_path):
    src = write_lines(tmp_path / "in.txt", lines)
    code, stdout, stderr = run_app(
        translate.main, f"model={bundle_dir}", f"input={src}", "scores=true", *BASE
    )
    assert code == 0, stderr
    rows = [line.split("\t") for line in stdout.splitlines()]
    assert [len(r) for r in rows] == [2] * len(lines)
    assert [r[0] for r in rows] == expected(model, tokenizer, lines)
    assert rows[1] == ["", "0.0000"]
    assert all(float(r[1]) < 0 for i, r in enumerate(rows) if lines[i].strip())


@pytest.mark.slow
def test_nbest_format(run_app, bundle_dir, model, tokenizer, lines, tmp_path):
    src = write_lines(tmp_path / "in.txt", lines)
    code, stdout, stderr = run_app(
        translate.main, f"model={bundle_dir}", f"input={src}", *BASE, "decode.beam_size=3",
        "decode.nbest=3",
    )  # fmt: skip
    assert code == 0, stderr
    rows = [line.split("\t") for line in stdout.splitlines()]
    assert all(len(r) == 3 for r in rows)
    by_index: dict[int, list[tuple[str, float]]] = {}
    for index, text, score in rows:
        by_index.setdefault(int(index), []).append((text, float(score)))
    assert list(by_index) == list(range(len(lines)))  # every line, in order, 0-based
    best = expected(model, tokenizer, lines, beam_size=3)
    for i, hyps in by_index.items():
        assert 1 <= len(hyps) <= 3
        assert hyps[0][0] == best[i]
        assert [s for _, s in hyps] == sorted((s for _, s in hyps), reverse=True)
        assert len(hyps) == (3 if lines[i].strip() else 1)


@pytest.mark.slow
def test_alignments_and_attention_plots(run_app, bundle_dir, tokenizer, lines, tmp_path):
    src = write_lines(tmp_path / "in.txt", lines)
    align, plots = tmp_path / "align.jsonl", tmp_path / "plots"
    code, _, stderr = run_app(
        translate.main, f"model={bundle_dir}", f"input={src}", f"output={tmp_path / 'out'}",
        f"alignments={align}", f"attention_plot={plots}", *BASE,
    )  # fmt: skip
    assert code == 0, stderr
    records = [json.loads(line) for line in read_lines(align)]
    assert len(records) == len(lines)
    for line, record in zip(lines, records, strict=True):
        if not line.strip():
            assert record == {"src_pieces": [], "tgt_pieces": [], "attention": []}
            continue
        n_src = min(LIMIT, len(tokenizer.encode_src([line.strip()])[0]))
        assert len(record["src_pieces"]) == n_src
        assert record["tgt_pieces"][-1] == "</s>"
        assert len(record["attention"]) == len(record["tgt_pieces"])
        assert all(len(row) == n_src for row in record["attention"])
        assert all(abs(sum(row) - 1) < 1e-2 for row in record["attention"])
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == [f"{i + 1:06d}.png" for i, line in enumerate(lines) if line.strip()]
    assert (plots / pngs[0]).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "pass model=BUNDLE"),
        (("model=/nonexistent/bundle",), "not a model bundle"),
        (("decode.beam_size=2", "decode.nbest=3"), "decode.nbest=3 must be between"),
        (("input=/nonexistent/in.txt",), "input file not found"),
    ],
)
def test_translate_usage_errors(run_app, bundle_dir, args, message):
    if not any(a.startswith("model=") for a in args) and args:
        args = (f"model={bundle_dir}", *args)
    code, stdout, stderr = run_app(translate.main, *args)
    assert code == 2
    assert message in stderr and stderr.startswith("error: ")
    assert stdout == ""


def test_read_input_splits_on_newline_only(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes("\ufeffa\r\nb\u2028c\n\nd".encode())
    assert list(translate.read_input(str(path))) == ["a\r", "b\u2028c", "", "d"]


# ------------------------------------------------------------------------------ plotting


def test_plot_attention_checks_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"expected \(target pieces, source pieces\) = \(2, 3\)"):
        plotting.plot_attention(
            ["a", "b", "c"], ["x", "</s>"], torch.ones(3, 2), tmp_path / "p.png"
        )


def test_plot_attention_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(plotting.PlottingUnavailable, match=r"pip install seq2seq\[plot\]"):
        plotting.plot_attention(["a"], ["</s>"], [[1.0]], tmp_path / "p.png")


# ----------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def eval_files(pairs, tmp_path_factory) -> dict[str, Path]:
    """A hypothesis file that is an imperfect copy of its references."""
    root = tmp_path_factory.mktemp("eval")
    refs = [t for _, t in pairs[:40]]
    refs2 = [f"{t} ." if i % 2 else t.upper() for i, t in enumerate(refs)]
    hyps = [t if i % 3 else " ".join(t.split()[:-1]) or "x" for i, t in enumerate(refs)]
    return {
        "hyp": write_lines(root / "hyp.txt", hyps),
        "ref": write_lines(root / "ref.txt", refs),
        "ref2": write_lines(root / "ref2.txt", refs2),
        "short": write_lines(root / "short.txt", refs[:-3]),
    }


def sacrebleu_scores(hyp: Path, refs: list[Path], **bleu_args) -> dict[str, float]:
    hyps, streams = read_lines(hyp), [read_lines(r) for r in refs]
    return {
        "BLEU": sacrebleu.corpus_bleu(hyps, streams, **bleu_args).score,
        "chrF2": sacrebleu.corpus_chrf(hyps, streams).score,
        "TER": sacrebleu.corpus_ter(hyps, streams).score,
    }


def report_scores(path: Path) -> dict[str, float]:
    return {name: entry["score"] for name, entry in json.loads(path.read_text()).items()}


@pytest.mark.slow
def test_evaluate_equals_sacrebleu(run_app, eval_files, tmp_path):
    report = tmp_path / "report.json"
    code, stdout, stderr = run_app(
        evaluate.main, f"hyp={eval_files['hyp']}", f"ref={eval_files['ref']}", f"json={report}"
    )
    assert code == 0, stderr
    direct = sacrebleu_scores(eval_files["hyp"], [eval_files["ref"]])
    assert report_scores(report) == direct
    assert 0 < direct["BLEU"] < 100
    assert "cased detokenised sacreBLEU" in stdout.splitlines()[0]
    assert f"{direct['BLEU']:.2f}" in stdout and "nrefs:1|case:mixed" in stdout


@pytest.mark.slow
def test_evaluate_multiple_references(run_app, eval_files, tmp_path):
    report = tmp_path / "report.json"
    refs = f"ref=[{eval_files['ref']},{eval_files['ref2']}]"
    code, stdout, stderr = run_app(
        evaluate.main, f"hyp={eval_files['hyp']}", refs, f"json={report}"
    )
    assert code == 0, stderr
    assert report_scores(report) == sacrebleu_scores(
        eval_files["hyp"], [eval_files["ref"], eval_files["ref2"]]
    )
    assert "nrefs:2" in stdout


@pytest.mark.slow
def test_evaluate_tokenized_lowercase_is_labelled(run_app, eval_files, tmp_path):
    report = tmp_path / "report.json"
    code, stdout, stderr = run_app(
        evaluate.main, f"hyp={eval_files['hyp']}", f"ref={eval_files['ref2']}", f"json={report}",
        "lowercase=true", "tokenize=intl",
    )  # fmt: skip
    assert code == 0, stderr
    direct = sacrebleu_scores(
        eval_files["hyp"], [eval_files["ref2"]], lowercase=True, tokenize="intl"
    )
    assert report_scores(report) == direct
    assert "lowercase=true, tokenize=intl" in stdout.splitlines()[0]
    assert "not the headline" in stdout.splitlines()[0]


@pytest.mark.slow
def test_evaluate_line_count_mismatch_names_both_counts(eval_files, tmp_path):
    result = cli("evaluate", f"hyp={eval_files['hyp']}", f"ref={eval_files['short']}", cwd=tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "40" in stderr and "37" in stderr and stderr.startswith("error: ")
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_evaluate_model_translates_writes_hypotheses_and_scores(
    run_app, bundle_dir, model, tokenizer, pairs, tmp_path
):
    src = write_lines(tmp_path / "src.txt", [s for s, _ in pairs[:10]])
    ref = write_lines(tmp_path / "ref.txt", [t for _, t in pairs[:10]])
    report = tmp_path / "eval" / "report.json"
    code, stdout, stderr = run_app(
        evaluate.main, f"model={bundle_dir}", f"src={src}", f"ref={ref}", f"json={report}",
        "decode=greedy",
    )  # fmt: skip
    assert code == 0, stderr
    hyp = tmp_path / "eval" / "report.hyp.txt"
    assert f"hypotheses: {hyp}" in stdout
    translator = Translator(model, tokenizer, DecodeConfig(beam_size=1))
    assert read_lines(hyp) == translator.translate(read_lines(src))
    assert report_scores(report) == sacrebleu_scores(hyp, [ref])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("hyp={hyp}",), "no reference given"),
        (("ref={ref}",), "nothing to score"),
        (("model=m", "ref={ref}"), "pass src=FILE"),
        (("model=m", "hyp={hyp}", "src={ref}", "ref={ref}"), "not both"),
        (("hyp={hyp}", "ref={ref}", "tokenize=moses"), "choose one of"),
        (("hyp={hyp}", "ref=/nonexistent/ref.txt"), "not found"),
    ],
)
def test_evaluate_usage_errors(run_app, eval_files, args, message):
    code, stdout, stderr = run_app(evaluate.main, *(a.format(**eval_files) for a in args))
    assert code == 2
    assert message in stderr and stdout == ""


def test_single_ref_override_becomes_a_list():
    assert evaluate.listify_ref(["hyp=h", "ref=r.txt", "ref=[a,b]"]) == [
        "hyp=h",
        "ref=['r.txt']",
        "ref=[a,b]",
    ]
    assert evaluate.listify_ref(["ref=~/it's.txt"]) == ["ref=['~/it\\'s.txt']"]


# ------------------------------------------------------------------------------ train

TINY = [
    "tokenizer.vocab_size=100",
    "model.embedding_size=16",
    "model.hidden_size=16",
    "model.attention_size=16",
    "train.max_steps=4",
    "train.valid_every=2",
    "train.device=cpu",
]


def own_corpus(directory: Path, pairs, *, tsv_bad_rows: int = 0) -> dict[str, Path]:
    """Aligned train/dev text files and the same training pairs as one TSV file
    with ``tsv_bad_rows`` malformed rows among them."""
    paths = {}
    for split, part in (("train", pairs[:150]), ("dev", pairs[150:180])):
        for side, lang in enumerate(("en", "de")):
            name = f"{split}.{lang}"
            paths[name] = write_lines(directory / name, [pair[side] for pair in part])
    rows = [f"{s}\t{t}" for s, t in pairs[:150]]
    for number in range(tsv_bad_rows):
        rows.insert(10 * number, f"bad row {number}")
    paths["train.tsv"] = write_lines(directory / "train.tsv", rows)
    return paths


def train_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    caches = [f"tokenizer.cache_dir={tmp_path / 'spm'}", f"data.cache_dir={tmp_path / 'tok'}"]
    return cli("train", f"run_dir={tmp_path / 'run'}", *caches, *TINY, *args, cwd=tmp_path)


def test_the_plain_command_trains_on_own_files_with_the_general_settings(pairs, tmp_path):
    files = own_corpus(tmp_path, pairs)
    done = train_cli(
        tmp_path,
        "data=files",
        f"data.train.src={files['train.en']}",
        f"data.train.tgt={files['train.de']}",
        f"data.valid.src={files['dev.en']}",
        f"data.valid.tgt={files['dev.de']}",
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    run = tmp_path / "run"
    assert (run / "best" / bundle.WEIGHTS).exists()
    records = bundle.load_metrics(run)
    assert [r["step"] for r in records if r["kind"] == "valid"] == [2, 4]
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    general = OmegaConf.structured(TrainApp(run_dir="x"))
    for key in ("optim.lr", "model.dropout", "train.max_tokens", "train.max_time"):
        assert OmegaConf.select(saved, key) == OmegaConf.select(general, key), key


def test_skipped_bad_rows_are_counted_in_the_metrics(pairs, tmp_path):
    files = own_corpus(tmp_path, pairs, tsv_bad_rows=4)
    done = train_cli(
        tmp_path,
        "data=files",
        "data.format=tsv",
        f"data.train.path={files['train.tsv']}",
        f"data.dir={tmp_path}",
        "data.valid.stem=dev",
        "data.skip_bad_rows=true",
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    (record,) = [r for r in bundle.load_metrics(tmp_path / "run") if r["kind"] == "data"]
    assert (record["lines"], record["bad_rows"]) == (154, 4)
    assert record["bad_examples"] == [
        f"{files['train.tsv']}:{line}: expected 'source<TAB>target' (exactly one tab), found 0 tabs"
        for line in (1, 11, 21)
    ]
    assert "skipped 4 bad rows of 154" in (done.stdout + done.stderr).decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.format=tsv", "data.train.path=t.tsv"], "add data=files"),
        (["data.dir=corpus"], "data.dir=corpus reads your own corpus"),
        (["data=files"], "no train split configured for data.format=text"),
    ],
)
def test_own_corpus_mistakes_are_one_line(run_app, tmp_path, args, message):
    code, out, err = run_app(train.main, f"run_dir={tmp_path / 'run'}", *args)
    one_error_line(code, err)
    assert message in err and out == ""
