"""The metric wrappers must give exactly sacrebleu's numbers, and refuse misaligned files."""

from __future__ import annotations

import json

import pytest
import sacrebleu

from seq2seq.metrics import Score, bleu, corpus_scores, format_table, to_json

HYPS = [
    "The cat sat on the mat.",
    "A dog barks loudly in the Garden.",
    "hello World",
    "It rains, it pours.",
]
REFS_1 = [
    "The cat sat on a mat.",
    "A dog is barking loudly in the garden.",
    "Hello world!",
    "It is raining and pouring.",
]
REFS_2 = [
    "the cat was sitting on the mat .",
    "The dog barks loud in the garden.",
    "hello, world",
    "It rains, it pours.",
]


@pytest.mark.parametrize("refs", [[REFS_1], [REFS_1, REFS_2]], ids=["one-ref", "two-refs"])
@pytest.mark.parametrize("lowercase", [False, True])
def test_scores_equal_sacrebleu(refs: list[list[str]], lowercase: bool) -> None:
    scores = {s.name: s for s in corpus_scores(HYPS, refs, lowercase=lowercase)}
    assert list(scores) == ["BLEU", "chrF2", "TER"]
    expected_bleu = sacrebleu.corpus_bleu(HYPS, refs, lowercase=lowercase).score
    assert scores["BLEU"].score == pytest.approx(expected_bleu)
    assert scores["chrF2"].score == pytest.approx(sacrebleu.corpus_chrf(HYPS, refs).score)
    assert scores["TER"].score == pytest.approx(sacrebleu.corpus_ter(HYPS, refs).score)
    assert f"nrefs:{len(refs)}" in scores["BLEU"].signature
    assert ("case:lc" if lowercase else "case:mixed") in scores["BLEU"].signature
    assert "tok:13a" in scores["BLEU"].signature


def test_tokenizer_reaches_bleu() -> None:
    [score, *_] = corpus_scores(HYPS, [REFS_1], tokenize="char")
    assert score.score == pytest.approx(
        sacrebleu.corpus_bleu(HYPS, [REFS_1], tokenize="char").score
    )
    assert "tok:char" in score.signature


def test_quick_bleu_is_cased_13a_bleu() -> None:
    assert bleu(HYPS, REFS_1) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS_1]).score)
    assert bleu(REFS_1, REFS_1) == pytest.approx(100.0)


def test_line_count_mismatch_names_both_counts_and_the_reference() -> None:
    with pytest.raises(ValueError, match="hypotheses have 4 lines but reference 2 has 3"):
        corpus_scores(HYPS, [REFS_1, REFS_2[:3]])
    with pytest.raises(ValueError, match="hypotheses have 3 lines but reference 1 has 4"):
        bleu(HYPS[:3], REFS_1)


def test_malformed_reference_lists_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least one reference stream"):
        corpus_scores(HYPS, [])
    with pytest.raises(ValueError, match=r"wrap a single reference stream as \[refs\]"):
        corpus_scores(HYPS, REFS_1)


def test_table_and_json_report_every_metric() -> None:
    scores = corpus_scores(HYPS, [REFS_1])
    table = format_table(scores)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "score", "signature"]
    assert len(lines) == 1 + len(scores)
    for score, line in zip(scores, lines[1:], strict=True):
        assert line.split() == [score.name, f"{score.score:.2f}", score.signature]
    # Aligned: every signature column starts at the same offset.
    assert len({line.index(line.split()[2]) for line in lines}) == 1
    data = json.loads(json.dumps(to_json(scores)))
    assert data == {s.name: {"score": s.score, "signature": s.signature} for s in scores}


def test_score_is_a_plain_record() -> None:
    score = Score(name="BLEU", score=12.5, signature="nrefs:1")
    assert to_json([score]) == {"BLEU": {"score": 12.5, "signature": "nrefs:1"}}
