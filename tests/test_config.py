"""Every primary composes with every option of every group and builds."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seq2seq import train
from seq2seq._hydra import register_configs
from seq2seq.config import (
    RANGES,
    DecodeConfig,
    EvaluateApp,
    ServeApp,
    TrainApp,
    TranslateApp,
    conf_dir,
    validate,
)
from seq2seq.model.model import Seq2Seq

register_configs()
CONF = Path(conf_dir())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize(
    "group", ["data", "tokenizer", "arch", "optim", "decode", "experiment", "debug"]
)
def test_every_group_option_composes(group):
    for option in _options(group):
        overrides = [f"{group}={option}", "run_dir=x"]
        if option == "files":
            overrides += [
                f"data.{s}.{side}=f" for s in ("train", "valid") for side in ("src", "tgt")
            ]
        config = OmegaConf.to_object(_compose("train", overrides))
        assert isinstance(config, TrainApp)
        tgt_vocab = max(60, config.model.softmax_head + 1)  # a two-level head needs a tail
        Seq2Seq.from_config(config.model, src_vocab=50, tgt_vocab=tgt_vocab, pad_id=0)


def test_unknown_keys_fail():
    with pytest.raises(Exception, match="hiden_size"):
        _compose("train", ["model.hiden_size=3", "run_dir=x"])


def test_translate_and_evaluate_primaries():
    assert isinstance(OmegaConf.to_object(_compose("translate", ["model=b"])), TranslateApp)
    evaluate = OmegaConf.to_object(_compose("evaluate", ["hyp=h", "ref=[a,b]"]))
    assert isinstance(evaluate, EvaluateApp) and evaluate.ref == ["a", "b"]


def test_defaults_train_on_the_builtin_corpus_and_stop():
    config = OmegaConf.to_object(_compose("train", ["run_dir=x"]))
    assert config.data.format == "builtin"
    t = config.train
    assert t.max_steps or t.max_epochs or t.max_time or t.patience


@pytest.mark.parametrize("overrides", [[], ["optim=adamw", "tokenizer=bpe", "arch=luong"]])
def test_corpus_recipe_is_not_undone_by_generic_groups(overrides):
    """recipe/builtin.yaml (selected by data=builtin, the default) sets vocabulary, sizes
    and learning rate for its corpus; the generic tokenizer/optim/arch groups must not
    reset them."""
    recipe = OmegaConf.load(CONF / "recipe" / "builtin.yaml")
    config = _compose("train", ["run_dir=x", *overrides])
    for group in ("tokenizer", "model", "optim", "train"):
        for key, value in recipe[group].items():
            assert config[group][key] == value, f"{group}.{key}"


@pytest.mark.parametrize(
    "corpus",
    [
        [f"data.{s}.{side}=f" for s in ("train", "valid") for side in ("src", "tgt")],
        ["data.dir=corpus"],
        ["data.format=parquet", "data.train.path=t.parquet", "data.valid.path=v.parquet"],
    ],
    ids=["files", "dir", "parquet"],
)
def test_own_corpus_gets_the_general_settings(corpus):
    """data=files has no recipe: the schema's general defaults apply, with nothing
    else named on the command line."""
    config = OmegaConf.to_object(_compose("train", ["run_dir=x", "data=files", *corpus]))
    general = TrainApp(run_dir="x")
    assert config.data.name == "files"
    for group in ("tokenizer", "model", "optim", "train"):
        assert getattr(config, group) == getattr(general, group), group


@pytest.mark.parametrize("experiment", ["builtin_en_de", "multi30k_en_de_25min"])
def test_a_named_experiment_keeps_its_corpus_and_recipe(experiment):
    config = _compose("train", ["run_dir=x", f"experiment={experiment}"])
    own = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    recipe = OmegaConf.load(CONF / "recipe" / "builtin.yaml") if "builtin" in experiment else own
    assert config.data.name == ("builtin" if "builtin" in experiment else "multi30k")
    for group in ("tokenizer", "model", "optim", "train"):
        for key, value in recipe.get(group, {}).items():
            assert config[group][key] == value, f"{group}.{key}"


@pytest.mark.parametrize("overrides", [[], ["data.tgt_lang=fr"], ["experiment=builtin_en_de"]])
def test_the_builtin_corpus_with_its_recipe_is_not_refused(overrides):
    config = OmegaConf.to_object(_compose("train", ["run_dir=x", *overrides]))
    train.check_recipe(config, "builtin")  # the recipe data=builtin chose


def test_command_line_beats_the_corpus_recipe():
    config = _compose("train", ["run_dir=x", "tokenizer.vocab_size=123", "optim.lr=0.5"])
    assert config.tokenizer.vocab_size == 123 and config.optim.lr == 0.5


def test_the_25_minute_experiment_trains_its_members_side_by_side_in_its_budget():
    """Its pair trains at once, each member for the whole 24 minutes; one after
    another would leave two half-trained members."""
    overrides = ["run_dir=x", "experiment=multi30k_en_de_25min"]
    t = OmegaConf.to_object(_compose("train", overrides)).train
    assert (t.ensemble, t.ensemble_parallel, t.max_time) == (2, 2, 1440)


def test_the_2_hour_experiment_trains_two_waves_of_two_members():
    """Four members, two at a time, each with a budget in steps under the time cap,
    and subword sampling on."""
    overrides = ["run_dir=x", "experiment=multi30k_en_de"]
    config = OmegaConf.to_object(_compose("train", overrides))
    t = config.train
    assert (t.ensemble, t.ensemble_parallel, t.max_time, t.max_steps) == (4, 2, 6600, 10000)
    assert config.tokenizer.sampling_alpha > 0


# ------------------------------------------------------------------ keys and ranges


def _one_error_line(code: int, stderr: str) -> str:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.parametrize(
    ("app", "args", "message"),
    [
        (
            "train",
            ["+train.max_step=20"],
            "unknown key train.max_step; did you mean train.max_steps?",
        ),
        (
            "train",
            ["train.max_step=20"],
            "unknown key train.max_step; did you mean train.max_steps?",
        ),
        ("train", ["+trian.seed=1"], "unknown key trian; did you mean train?"),
        ("translate", ["model=m", "+outptu=x.txt"], "unknown key outptu; did you mean output?"),
        ("translate", ["model=m", "+decode.beem=3"], "did you mean decode.beam_size?"),
        ("evaluate", ["ref=r", "+hpy=h"], "unknown key hpy; did you mean hyp?"),
        ("serve", ["model=m", "+prot=1"], "unknown key prot; did you mean port?"),
    ],
)
def test_unknown_keys_are_refused_naming_the_nearest(run_app, tmp_path, app, args, message):
    """With or without ``+``: Hydra accepts ``+key=`` into the schema, and the key
    was then ignored (a training ran to its other budget, an output went to stdout)."""
    if app == "train":
        args = [f"run_dir={tmp_path / 'run'}", *args]
    code, stdout, stderr = run_app(importlib.import_module(f"seq2seq.{app}").main, *args)
    assert message in _one_error_line(code, stderr)
    assert stdout == "" and not (tmp_path / "x.txt").exists()


@pytest.mark.parametrize(
    ("app", "arg", "message"),
    [
        ("train", "train.accumulate=0", "train.accumulate=0; it must be"),
        ("train", "train.accumulate=-2", "train.accumulate=-2"),
        ("train", "train.valid_every=0", "train.valid_every=0"),
        ("train", "train.log_every=0", "train.log_every=0"),
        ("train", "train.max_steps=-5", "train.max_steps=-5"),
        ("train", "optim.lr=nan", "optim.lr=nan; it must be a finite number"),
        ("train", "train.max_time=inf", "train.max_time=inf"),
        ("train", "model.dropout=1.0", "model.dropout=1.0"),
        ("train", "model.word_dropout=-0.1", "model.word_dropout=-0.1"),
        ("train", "data.max_ratio=0.5", "data.max_ratio=0.5"),
        ("train", "train.seed=99999999999999999999999", "train.seed="),
        ("translate", "decode.max_len_a=1e9", "decode.max_len_a=1000000000.0; it must be"),
        ("translate", "decode.max_len_a=1e19", "decode.max_len_a="),
        ("translate", "decode.max_len_b=-1", "decode.max_len_b=-1"),
        ("translate", "chunk_size=0", "chunk_size=0"),
        ("evaluate", "decode.alpha=-inf", "decode.alpha=-inf"),
        ("serve", "port=70000", "port=70000"),
        ("serve", "max_wait_ms=nan", "max_wait_ms=nan"),
    ],
)
def test_numbers_out_of_range_are_refused(run_app, tmp_path, app, arg, message):
    args = {
        "train": [f"run_dir={tmp_path / 'run'}"],
        "translate": ["model=m"],
        "evaluate": ["hyp=h", "ref=r"],
        "serve": ["model=m"],
    }[app]
    code, _, stderr = run_app(importlib.import_module(f"seq2seq.{app}").main, *args, arg)
    assert message in _one_error_line(code, stderr)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _schemas(root: type) -> set[type]:
    found = {root}
    for kind in typing.get_type_hints(root).values():
        if dataclasses.is_dataclass(kind):
            found |= _schemas(kind)  # type: ignore[arg-type]
    return found


def test_every_numeric_field_has_a_range():
    """A new numeric setting must say which values it takes."""
    missing = []
    for app in (TrainApp, TranslateApp, EvaluateApp, ServeApp):
        for schema in _schemas(app):
            for name, kind in typing.get_type_hints(schema).items():
                if kind in (int, float) and name not in RANGES.get(schema, {}):
                    missing.append(f"{schema.__name__}.{name}")
    assert missing == []


@pytest.mark.parametrize("group", ["data", "tokenizer", "arch", "optim", "decode", "debug"])
def test_every_group_option_is_in_range(group):
    for option in _options(group):
        overrides = [f"{group}={option}", "run_dir=x"]
        if option == "files":
            overrides += [
                f"data.{s}.{side}=f" for s in ("train", "valid") for side in ("src", "tgt")
            ]
        validate(OmegaConf.to_object(_compose("train", overrides)))


def test_ranges_name_the_nested_key():
    bad = TrainApp(run_dir="x", decode=DecodeConfig(beam_size=2, nbest=3))
    with pytest.raises(ValueError, match=r"^decode.nbest=3 must be between 1 and decode.beam"):
        validate(bad)
