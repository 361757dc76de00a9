"""The generated corpus: deterministic, disjoint splits, one target per source."""

from __future__ import annotations

import random
import re

import pytest

from seq2seq.config import BuiltinConfig
from seq2seq.data.builtin import SUPPORTED_LANGUAGES, _language, generate_pairs, make_splits


@pytest.fixture(scope="module")
def en_de() -> list[tuple[str, str]]:
    return generate_pairs(6000, seed=7)


def test_deterministic_for_a_seed() -> None:
    assert generate_pairs(300, seed=3) == generate_pairs(300, seed=3)


def test_different_seeds_differ() -> None:
    assert generate_pairs(300, seed=3) != generate_pairs(300, seed=4)


def test_size_and_global_random_untouched() -> None:
    random.seed(0)
    expected = random.random()
    random.seed(0)
    pairs = generate_pairs(50, seed=1)
    assert len(pairs) == 50
    assert random.random() == expected


def test_same_source_always_same_target(en_de: list[tuple[str, str]]) -> None:
    seen: dict[str, str] = {}
    for source, target in [*en_de, *generate_pairs(3000, seed=8)]:
        assert seen.setdefault(source, target) == target, source


def test_may_is_not_ambiguous(en_de: list[tuple[str, str]]) -> None:
    """English "May 3, 2021" is both the long and the medium date: the long one wins."""
    may = {s: t for s, t in en_de if s.startswith("May ")}
    assert may and all(". Mai " in t for t in may.values())


def test_german_numbers_reorder_units_and_tens(en_de: list[tuple[str, str]]) -> None:
    two_digit = {s: t for s, t in en_de if re.fullmatch(r"[a-z]+-[a-z]+", s)}
    assert len(two_digit) > 20
    assert all("und" in t for t in two_digit.values())
    assert dict(en_de)["ninety-four"] == "vierundneunzig"


def test_all_kinds_present(en_de: list[tuple[str, str]]) -> None:
    targets = [t for _, t in en_de]
    assert any(re.fullmatch(r"\d+\. [A-Z][a-zä]+ \d{4}", t) for t in targets)  # long date
    assert any(re.fullmatch(r"\d\d\.\d\d\.\d{4}", t) for t in targets)  # medium date
    assert any(t.endswith(" Kilometer") for t in targets)  # quantity
    assert ("France", "Frankreich") in en_de
    assert any(" und " in t and "," in t and not t[0].isdigit() for t in targets)  # list


def test_short_sentences_and_plain_spaces(en_de: list[tuple[str, str]]) -> None:
    lengths = [len(s.split()) for s, _ in en_de]
    assert max(lengths) <= 20
    assert sum(1 <= n <= 15 for n in lengths) / len(lengths) > 0.95
    text = "".join(s + t for s, t in generate_pairs(2000, seed=1, tgt_lang="fr"))
    assert "\u00a0" not in text and "\u202f" not in text and "  " not in text


@pytest.mark.parametrize(
    ("tgt_lang", "pair"),
    [
        ("de", ("France, Germany, and Spain", "Frankreich, Deutschland und Spanien")),
        ("fr", ("France, Germany, and Spain", "France, Allemagne et Espagne")),
        ("es", ("France, Germany, and Spain", "Francia, Alemania y España")),
    ],
)
def test_targets_de_fr_es(tgt_lang: str, pair: tuple[str, str]) -> None:
    pairs = generate_pairs(300, seed=2, tgt_lang=tgt_lang)
    assert len(pairs) == 300
    assert all(s and t for s, t in pairs)
    item = ("countries", ("FR", "DE", "ES"))
    assert (_language("en").render(item), _language(tgt_lang).render(item)) == pair


def test_every_supported_language_generates() -> None:
    for lang in SUPPORTED_LANGUAGES:
        assert len(generate_pairs(20, seed=1, tgt_lang=lang)) == 20


def test_splits_disjoint_with_right_sizes() -> None:
    cfg = BuiltinConfig(train_size=1500, valid_size=200, test_size=100, seed=3)
    splits = make_splits(cfg, src_lang="en", tgt_lang="de")
    assert {name: len(pairs) for name, pairs in splits.items()} == {
        "train": 1500,
        "valid": 200,
        "test": 100,
    }
    sources = [{s for s, _ in pairs} for pairs in splits.values()]
    assert sum(map(len, sources)) == 1800  # distinct within and across splits
    assert splits == make_splits(cfg, src_lang="en", tgt_lang="de")
    other = make_splits(BuiltinConfig(1500, 200, 100, seed=4), src_lang="en", tgt_lang="de")
    assert other["train"] != splits["train"]


def test_test_split_stable_when_train_size_changes() -> None:
    small = make_splits(BuiltinConfig(100, 50, 50, seed=1), src_lang="en", tgt_lang="de")
    large = make_splits(BuiltinConfig(400, 50, 50, seed=1), src_lang="en", tgt_lang="de")
    assert small["test"] == large["test"] and small["valid"] == large["valid"]


def test_unknown_language_names_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"'xx'.*supported: .*de.*en.*fr"):
        generate_pairs(10, seed=1, tgt_lang="xx")
    with pytest.raises(ValueError, match="'klingon'"):
        make_splits(BuiltinConfig(), src_lang="klingon", tgt_lang="de")
