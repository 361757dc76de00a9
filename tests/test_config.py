"""Every primary composes with every option of every group and builds."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seq2seq._hydra import register_configs
from seq2seq.config import EvaluateApp, TrainApp, TranslateApp, conf_dir
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
    """experiment/builtin_en_de.yaml (the default) sets vocabulary, sizes and learning
    rate for its corpus; the generic tokenizer/optim/arch groups must not reset them."""
    recipe = OmegaConf.load(CONF / "experiment" / "builtin_en_de.yaml")
    config = _compose("train", ["run_dir=x", *overrides])
    for group in ("tokenizer", "model", "optim", "train"):
        for key, value in recipe[group].items():
            assert config[group][key] == value, f"{group}.{key}"


def test_without_the_default_recipe_the_general_defaults_apply():
    files = [f"data.{s}.{side}=f" for s in ("train", "valid") for side in ("src", "tgt")]
    config = OmegaConf.to_object(
        _compose("train", ["run_dir=x", "~experiment", "data=files", *files])
    )
    assert config.data.format == "text"
    assert (config.tokenizer.vocab_size, config.model.hidden_size) == (8000, 512)


def test_command_line_beats_the_corpus_recipe():
    config = _compose("train", ["run_dir=x", "tokenizer.vocab_size=123", "optim.lr=0.5"])
    assert config.tokenizer.vocab_size == 123 and config.optim.lr == 0.5


def test_the_25_minute_experiment_trains_one_model_in_its_budget():
    """It inherits the 2-hour recipe, whose ensemble of 2 would split 24
    minutes into two half-trained members."""
    overrides = ["run_dir=x", "experiment=multi30k_en_de_25min"]
    config = OmegaConf.to_object(_compose("train", overrides))
    assert config.train.ensemble == 1 and config.train.max_time == 1440
