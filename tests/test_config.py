"""Typed config: validation, did-you-mean, overrides, derived defaults, no mutation."""

from __future__ import annotations

import pytest

from tunelab.config import ConfigError, config_from_dict, describe, dump_yaml, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rat'.*"):
        load_config(write(tmp_path, "train:\n  learning_rat: 1e-4\n"))
    p = write(tmp_path, "trian:\n  lr: 1e-4\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(p)
    with pytest.raises(ConfigError, match="did you mean 'lora.rank'"):
        load_config(write(tmp_path, "lora:\n  rnak: 8\n"))


def test_values_are_validated(tmp_path):
    for text, msg in [
        ("method: lroa\n", "did you mean 'lora'"),
        ("lora:\n  rank: 0\n", "lora.rank: must be >= 1"),
        ("train:\n  warmup: 5\n", "train.warmup"),
        ("train:\n  batch_size: two\n", "train.batch_size: expected an integer"),
        ("data:\n  truncation: cut\n", "not one of"),
        ("lora:\n  layers: bottom:3\n", "lora.layers"),
        ("data:\n  eval_fraction: 1.5\n", "eval_fraction"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load_config(write(tmp_path, text))


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:2: invalid YAML"):
        load_config(write(tmp_path, "name: x\nfoo: bar: baz\n"))


def test_overrides_and_defaults(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    p = write(tmp_path, "data:\n  train:\n    - path: d.jsonl\n")
    cfg, applied = load_config(p, ["train.lr=1e-4", "lora.targets=[q_proj, k_proj]", "train.early_stopping.patience=5"])
    assert applied == ["train.lr=1e-4", "lora.targets=[q_proj, k_proj]", "train.early_stopping.patience=5"]
    assert cfg.train.lr == 1e-4 and cfg.lora.targets == ["q_proj", "k_proj"] and cfg.train.early_stopping.patience == 5
    assert cfg.name == "c" and str(cfg.run_dir) == "runs/c"
    # dataset paths resolve against the config's folder
    assert cfg.data.train[0].path == str(tmp_path / "d.jsonl")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(p, ["train.lr"])


def test_derived_defaults_do_not_mutate_fields():
    cfg = config_from_dict({"method": "full"})
    assert cfg.lr == 1e-5 and cfg.train.lr is None  # derived, not written back
    cfg = config_from_dict({})
    assert cfg.lr == 2e-4 and cfg.lora_alpha == 32 and cfg.lora.alpha is None
    assert cfg.lora.targets == "qv" and cfg.lora.rank == 16 and cfg.lora.dropout == 0.05
    assert cfg.train.epochs == 2 and cfg.train.warmup == 0.05 and cfg.train.schedule == "cosine"
    assert cfg.early_stopping_on and cfg.data.eval_fraction is None  # the default eval split (data/pipeline.py)
    assert not config_from_dict({"data": {"eval_fraction": 0}}).early_stopping_on
    assert config_from_dict({"data": {"eval_fraction": 0.1}}).early_stopping_on
    assert config_from_dict({"data": {"eval": "e.jsonl"}}).data.eval.path == "e.jsonl"


def test_round_trip_yaml(tmp_path):
    cfg = config_from_dict({"name": "x", "lora": {"rank": 8, "layers": [0, 1]}, "data": {"train": [{"path": "a.jsonl", "weight": 2}]}})
    p = write(tmp_path, dump_yaml(cfg))
    again, _ = load_config(p)
    assert again.lora == cfg.lora and again.data.train[0].weight == 2.0


def test_every_field_documented():
    rows = describe()
    assert len(rows) > 40
    assert all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]
