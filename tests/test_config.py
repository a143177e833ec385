"""Config loading: YAML + typed key=value overrides, unknown keys, validation, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prodtune.config import (Config, apply_overrides, config_from_dict, describe_fields, load_config,
                             save_config, section_hash, to_dict)
from prodtune.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.run_dir == Path("outputs/run")
    assert load_config(None, ["output_dir=/tmp/x"]).run_dir == Path("/tmp/x")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # The first comment is the command that runs it.
    assert path.read_text().startswith("# prodtune ")


def test_shipped_configs_found():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "phi3-qlora.yaml"}


def test_phi3_qlora_is_the_original_recipe():
    cfg = load_config(next(p for p in CONFIGS if p.name == "phi3-qlora.yaml"))
    assert cfg.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"
    assert cfg.model.load_in_4bit and cfg.model.bnb_4bit_quant_type == "nf4"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (32, 64, 0.0, "all-linear")
    t = cfg.train
    assert (t.learning_rate, t.lr_scheduler, t.warmup_steps, t.epochs) == (2e-4, "linear", 10, 1.0)
    assert (t.optim, t.weight_decay, t.seed, t.max_length, cfg.data.sample_size) == (
        "adamw_8bit", 0.01, 3407, 2048, 100_000)
    # The one change, said in the file: 16k tokens per step on a GPU; the original 2 x 4 examples
    # is one override away (AmazonTitles examples average ~240 tokens).
    assert t.step_tokens == 16384
    from prodtune.train import make_plan

    original = load_config(next(p for p in CONFIGS if p.name == "phi3-qlora.yaml"),
                           ["train.step_tokens=2048", "train.speed=plain", "train.packing=false", "train.device=cpu"])
    batch = make_plan(original.train, original.model, example_tokens=240).batch
    assert (batch.per_device, batch.accum) == (2, 4)


def test_retired_grad_accum_names_its_replacement(tmp_path):
    with pytest.raises(UserError, match=r"train.grad_accum \(gone: set train.step_tokens"):
        load_config(None, ["train.grad_accum=4"])


def test_unknown_keys_all_listed_at_once_nested_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_nam": "x", "data": {"sample_sise": 5, "seed": 1},
                                    "train": {"lr": 1e-4, "epochs": 2}, "lora": {"rank": 4}}))
    with pytest.raises(UserError) as e:
        load_config(path, ["eval.max_sample=3"])
    msg = str(e.value)
    for key in ("run_nam", "data.sample_sise", "train.lr", "lora.rank", "eval.max_sample"):
        assert key in msg
    assert str(path) in msg and "config --fields" in msg
    assert "\n" not in msg


def test_unknown_section():
    with pytest.raises(UserError, match="optimizer"):
        config_from_dict({"optimizer": {"name": "adam"}})


def test_typed_overrides():
    cfg = load_config(None, [
        "train.learning_rate=1e-4",        # YAML 1.1 reads this as a string; we want a float
        "train.batch_size=8",
        "data.count_tokens=false",
        "data.sample_size=null",
        "data.question_templates=Describe {title}.,What is {title}?",
        "eval.max_samples=50",
        "train.epochs=2",                  # an int where a float is declared
        "model.dtype=bfloat16",
        "train.packing=true",
        "run_name=my run",
    ])
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.batch_size == 8 and isinstance(cfg.train.batch_size, int)
    assert cfg.data.count_tokens is False
    assert cfg.data.sample_size is None
    assert cfg.data.question_templates == ["Describe {title}.", "What is {title}?"]
    assert cfg.eval.max_samples == 50
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.model.dtype == "bfloat16"
    assert cfg.train.packing is True
    assert cfg.run_name == "my run"


def test_overrides_beat_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 2.0e-4\n  batch_size: 2\n")
    cfg = load_config(path, ["train.learning_rate=5e-5"])
    assert cfg.train.learning_rate == 5e-5 and cfg.train.batch_size == 2


def test_list_from_yaml_and_union_values():
    cfg = config_from_dict({"lora": {"target_modules": ["q_proj", "v_proj"]}})
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert load_config(None, ["train.packing=auto"]).train.packing == "auto"


@pytest.mark.parametrize("override, shown", [
    ("train.batch_size=abc", "'abc'"),
    ("train.batch_size=2.5", "2.5"),
    ("train.learning_rate=fast", "'fast'"),
    ("data.count_tokens=maybe", "'maybe'"),
    ("model.dtype=float8", "'float8'"),
    ("train.packing=sometimes", "'sometimes'"),
    ("data.seed=null", "None"),
])
def test_bad_type_names_the_key_and_value(override, shown):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert f"'{override.split('=')[0]}'" in str(e.value)
    assert shown in str(e.value)


def test_section_given_a_scalar():
    with pytest.raises(UserError, match="'train'.*section"):
        config_from_dict({"train": 5})


def test_override_without_equals():
    with pytest.raises(UserError, match="key=value"):
        load_config(None, ["train.batch_size"])
    with pytest.raises(UserError, match="not a config section"):
        apply_overrides({"run_name": "x"}, ["run_name.sub=1"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


def test_validate_collects_every_problem():
    with pytest.raises(UserError) as e:
        load_config(None, ["data.val_fraction=0.7", "data.test_fraction=0.5", "lora.r=0",
                           "train.batch_size=0", "data.question_templates=no placeholder",
                           "data.sample_size=0", "eval.batch_size=0", "data.chunk_rows=0",
                           "train.step_tokens=0"])
    msg = str(e.value)
    for part in ("val_fraction", "lora.r", "train.batch_size", "no placeholder", "data.sample_size",
                 "eval.batch_size", "data.chunk_rows", "train.step_tokens=0"):
        assert part in msg, part
    assert "\n" not in msg


def test_save_config_round_trips(tmp_path):
    cfg = load_config(next(p for p in CONFIGS if p.name == "demo.yaml"),
                      ["train.learning_rate=3e-4", "data.sample_size=123", "lora.target_modules=all-linear",
                       "data.question_templates=Q about {title}?", "output_dir=" + str(tmp_path)])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]   # no temporary file left


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_round_trip(tmp_path, path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_section_hash_tracks_changes():
    a, b = load_config(), load_config(None, ["data.seed=1"])
    assert section_hash(a.data) == section_hash(load_config().data)
    assert section_hash(a.data) != section_hash(b.data)
    assert section_hash(a.train) == section_hash(b.train)


def test_every_field_documented():
    text = describe_fields()
    cfg = Config()
    for section in ("data", "model", "lora", "train", "eval"):
        for key in to_dict(getattr(cfg, section)):
            line = next((ln for ln in text.splitlines() if ln.strip().startswith(f"{section}.{key} =")), None)
            assert line is not None, f"{section}.{key} missing from describe_fields"
            doc = text.splitlines()[text.splitlines().index(line) + 1].strip()
            assert doc, f"{section}.{key} has no docstring"


def test_values_dict_entry_point_for_notebooks(tmp_path):
    """The notebooks' parameters cell goes through the same loader as the CLI: typed values on top."""
    from prodtune.config import load_config

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg = load_config(demo, ["lora.r=8"], values={"lora.r": 4, "output_dir": tmp_path / "run",
                                                  "data.sample_size": None, "eval.max_samples": 3})
    assert cfg.lora.r == 4 and cfg.output_dir == str(tmp_path / "run") and cfg.eval.max_samples == 3
    assert cfg.data.sample_size is None and cfg.run_name == "demo"
    with pytest.raises(UserError, match="lora.nope"):
        load_config(demo, values={"lora.nope": 1})
    with pytest.raises(UserError, match="'run_name' is not a config section"):
        load_config(demo, values={"run_name.x": 1})


@pytest.mark.parametrize("override", ["=5", "train.=5", "nothing"])
def test_malformed_override_names_itself(override):
    from prodtune.config import load_config

    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert override in str(err.value) and "unknown config keys" not in str(err.value)
