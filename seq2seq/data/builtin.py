"""The built-in offline parallel corpus: generated from real locale data, no download.

Why it exists: the toolkit must train, translate and be tested end to end on a
machine without network access, on a corpus hard enough to need attention yet
small and clean enough to be learned in minutes on a CPU. Every pair is rendered
from one abstract item (a number, a date, a quantity, a list of countries) into
the source and the target language with num2words (numbers in words) and Babel's
CLDR data (dates, unit names, country names, list patterns). Nothing is made up
by hand, so the target side is real, grammatical locale data.

What is generated (shares are per drawn item, before de-duplication):

* 25 % numbers 0-9999 written in words: en "ninety-four" -> de "vierundneunzig".
  German puts units before tens, so the model must learn a non-monotonic alignment.
  The number of digits is drawn uniformly, so short numbers are frequent.
* 15 % quantities, digits and a unit out of a fixed set of 14: "94 kilometers" ->
  "94 Kilometer" (CLDR plural forms and digit grouping: "1,234" -> "1.234").
* 25 % dates 1900-2099 in the long or medium CLDR format: "March 3, 2021" ->
  "3. März 2021", "Mar 3, 2021" -> "03.03.2021".
* 20 % lists of 1-3 out of 76 common countries: "France, Germany, and Spain" ->
  "Frankreich, Deutschland und Spanien".
* 15 % combined: CLDR lists of 2-3 quantities, "3 kilometers and 5 hours" ->
  "3 Kilometer und 5 Stunden". (Lists of numbers in words are left out on purpose:
  "eight hundred and four" would be both 804 and the list [800, 4].)

Learnability rules (the toolkit promises near-perfect BLEU on this corpus):
the target is a function of the source (one source never has two targets; where
two formats render a source identically, e.g. English "May 3, 2021" is both the
long and the medium date, the long one wins on both sides); the vocabulary is
closed and small so each word is seen many times in 20k pairs; sentences are
short (mostly 1-15 words); non-breaking and narrow spaces are turned into plain
spaces on both sides.
"""

from __future__ import annotations

import datetime
import functools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from babel import Locale
from babel.dates import format_date
from babel.lists import format_list
from babel.units import format_unit
from num2words import num2words

from seq2seq.config import BuiltinConfig

# Languages checked to render numbers, dates, units and country names cleanly
# (num2words and Babel both know them, at least 12 of the 14 units render).
SUPPORTED_LANGUAGES = (
    "ca", "cs", "da", "de", "en", "es", "fi", "fr", "hu", "id", "is", "it", "lt",
    "lv", "nl", "no", "pl", "pt", "ro", "ru", "sk", "sl", "sv", "tr", "uk",
)  # fmt: skip

UNITS = (
    "length-kilometer", "length-meter", "length-centimeter", "mass-kilogram", "mass-gram",
    "duration-hour", "duration-minute", "duration-second", "duration-day", "duration-week",
    "volume-liter", "temperature-celsius", "speed-kilometer-per-hour", "area-square-meter",
)  # fmt: skip

# ISO 3166 codes of common countries whose CLDR names are plain words (no "&").
COUNTRIES = (
    "AR", "AT", "AU", "BE", "BG", "BR", "CA", "CH", "CL", "CN", "CO", "CU", "CZ", "DE",
    "DK", "DZ", "EE", "EG", "ES", "ET", "FI", "FR", "GB", "GH", "GR", "HR", "HU", "ID",
    "IE", "IL", "IN", "IQ", "IR", "IS", "IT", "JM", "JP", "KE", "KR", "LB", "LT", "LU",
    "LV", "MA", "MX", "MY", "NG", "NL", "NO", "NP", "NZ", "PE", "PH", "PK", "PL", "PT",
    "QA", "RO", "RS", "RU", "SA", "SE", "SG", "SK", "SN", "SY", "TH", "TN", "TR", "TW",
    "UA", "US", "UY", "VE", "VN", "ZA",
)  # fmt: skip

KIND_WEIGHTS = {"number": 25, "quantity": 15, "date": 25, "countries": 20, "combined": 15}

_FIRST_DAY = datetime.date(1900, 1, 1).toordinal()
_LAST_DAY = datetime.date(2099, 12, 31).toordinal()
_INVISIBLE = dict.fromkeys(map(ord, "\u200e\u200f\u00ad"))  # direction marks, soft hyphen


# ------------------------------------------------------------------------- items
#
# An item is a small tuple that says what to render, independent of language:
#   ("number", n) | ("quantity", n, unit) | ("date", ordinal, style)
#   ("countries", codes) | ("quantities", ((n, unit), ...))


def _draw_number(rng: random.Random, max_digits: int = 4) -> int:
    """A number with a uniformly drawn count of digits, so short numbers are common."""
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _draw_item(rng: random.Random, units: Sequence[str]) -> tuple:
    """Draw one abstract item; the kind follows ``KIND_WEIGHTS``."""
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    if kind == "number":
        return ("number", _draw_number(rng))
    if kind == "quantity":
        return ("quantity", max(1, _draw_number(rng)), rng.choice(units))
    if kind == "date":
        style = "long" if rng.random() < 0.6 else "medium"
        return ("date", rng.randint(_FIRST_DAY, _LAST_DAY), style)
    if kind == "countries":
        return ("countries", tuple(rng.sample(COUNTRIES, rng.randint(1, 3))))
    count = rng.randint(2, 3)
    return (
        "quantities",
        tuple((max(1, _draw_number(rng, 3)), rng.choice(units)) for _ in range(count)),
    )


# --------------------------------------------------------------------- rendering


def _clean(text: str) -> str:
    """Plain single spaces only: CLDR uses U+00A0/U+202F in some locales, not in others."""
    return " ".join(text.translate(_INVISIBLE).split())


@dataclass(frozen=True)
class _Language:
    """Renders items in one language from num2words and Babel's CLDR data."""

    code: str
    locale: Locale

    def number(self, n: int) -> str:
        return num2words(n, lang=self.code)

    def quantity(self, n: int, unit: str) -> str:
        return format_unit(n, unit, length="long", locale=self.locale)

    def date(self, ordinal: int, style: str) -> str:
        return format_date(datetime.date.fromordinal(ordinal), style, locale=self.locale)

    def listing(self, parts: Sequence[str]) -> str:
        return format_list(list(parts), locale=self.locale)

    def render(self, item: tuple) -> str:
        kind = item[0]
        if kind == "number":
            text = self.number(item[1])
        elif kind == "quantity":
            text = self.quantity(item[1], item[2])
        elif kind == "date":
            text = self.date(item[1], item[2])
        elif kind == "countries":
            text = self.listing([self.locale.territories[code] for code in item[1]])
        else:
            text = self.listing([self.quantity(n, unit) for n, unit in item[1]])
        return _clean(text)


@functools.cache
def _language(code: str) -> _Language:
    """The renderer for ``code``; ValueError naming the supported languages otherwise."""
    if code not in SUPPORTED_LANGUAGES:
        raise ValueError(
            f"builtin corpus: unsupported language {code!r} (data.src_lang / data.tgt_lang); "
            f"supported: {', '.join(SUPPORTED_LANGUAGES)}"
        )
    return _Language(code, Locale.parse(code))


@functools.cache
def _usable_units(src_lang: str, tgt_lang: str) -> tuple[str, ...]:
    """Units CLDR names properly in both languages (Babel falls back to the unit id)."""
    langs = (_language(src_lang), _language(tgt_lang))
    return tuple(
        unit
        for unit in UNITS
        if all(unit not in lang.quantity(n, unit) for lang in langs for n in (1, 2, 5, 22))
    )


def _canonical(item: tuple, src: _Language) -> tuple:
    """Make the item a function of its source text: a medium date that reads like the
    long one in the source language (en "May 3, 2021", fr "3 mars 2021") becomes long."""
    if item[0] == "date" and item[2] == "medium":
        long_item = ("date", item[1], "long")
        if src.render(item) == src.render(long_item):
            return long_item
    return item


def _iter_pairs(rng: random.Random, src_lang: str, tgt_lang: str) -> Iterator[tuple[str, str]]:
    """Endless stream of (source, target) pairs drawn with ``rng``."""
    src, tgt = _language(src_lang), _language(tgt_lang)
    units = _usable_units(src_lang, tgt_lang)
    while True:
        item = _canonical(_draw_item(rng, units), src)
        yield src.render(item), tgt.render(item)


# ------------------------------------------------------------------------ public


def generate_pairs(
    size: int, *, seed: int, src_lang: str = "en", tgt_lang: str = "de"
) -> list[tuple[str, str]]:
    """``size`` pairs drawn with ``random.Random(seed)``; may contain repeated pairs.

    Deterministic for a seed (never touches the global random state), and the same
    source always comes with the same target, whatever the seed.
    """
    if size < 0:
        raise ValueError(f"builtin corpus: size must be >= 0, got {size}")
    stream = _iter_pairs(random.Random(seed), src_lang, tgt_lang)
    return [next(stream) for _ in range(size)]


def make_splits(
    cfg: BuiltinConfig, *, src_lang: str, tgt_lang: str
) -> dict[str, list[tuple[str, str]]]:
    """Disjoint train/valid/test splits with the sizes of ``cfg``, deterministic for ``cfg.seed``.

    Pairs are drawn until enough distinct sources exist; duplicates by source are
    dropped so no test sentence was seen in training. Valid and test are taken
    first, so they do not change when only ``train_size`` changes.
    """
    sizes = {"valid": cfg.valid_size, "test": cfg.test_size, "train": cfg.train_size}
    if any(size < 0 for size in sizes.values()):
        raise ValueError(f"builtin corpus: split sizes must be >= 0, got {sizes}")
    needed = sum(sizes.values())
    stream = _iter_pairs(random.Random(cfg.seed), src_lang, tgt_lang)
    pool: dict[str, str] = {}
    for _ in range(20 * needed + 1000):
        if len(pool) >= needed:
            break
        source, target = next(stream)
        pool.setdefault(source, target)
    if len(pool) < needed:
        raise ValueError(
            f"builtin corpus: could only draw {len(pool)} distinct sentences, "
            f"but data.builtin asks for {needed} ({sizes}); lower the split sizes"
        )
    pairs = list(pool.items())
    splits: dict[str, list[tuple[str, str]]] = {}
    start = 0
    for name, size in sizes.items():
        splits[name] = pairs[start : start + size]
        start += size
    return {name: splits[name] for name in ("train", "valid", "test")}
