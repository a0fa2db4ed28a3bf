"""Config precedence, error paths and round trips (cstn.config)."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cstn import config as C

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "base.yaml"


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_base_yaml_holds_every_key_and_equals_defaults():
    data = yaml.safe_load(BASE.read_text())
    assert set(C.flatten(data)) == set(C.flatten(C.to_dict(C.Config())))
    assert C.load_config(BASE) == C.Config()


def test_every_field_has_a_docstring():
    docs = C.describe()
    missing = [k for k, v in docs.items() if not v.strip()]
    assert not missing, missing


def test_precedence_defaults_base_experiment_cli(tmp_path):
    write(tmp_path, "base.yaml", "train:\n  epochs: 7\n  seed: 3\nmodel:\n  num_classes: 20\n")
    exp = write(tmp_path, "exp.yaml", "train:\n  epochs: 9\n")
    cfg = C.load_config(exp, ["train.seed=5"])
    assert cfg.train.epochs == 9          # experiment beats base
    assert cfg.train.seed == 5            # command line beats base
    assert cfg.model.num_classes == 20    # base beats defaults
    assert cfg.optim.lr == C.OptimConfig().lr  # default kept
    cfg = C.load_config(exp, ["train.epochs=11"])
    assert cfg.train.epochs == 11         # command line beats experiment


def test_cli_value_types(tmp_path):
    cfg = C.load_config(None, ["model.levels=[5]", "model.kernel_sizes=[3]", "model.paddings=[1]",
                               "optim.lr=0.5", "optim.weight_decay=0", "data.random_flip=false",
                               "model.backbone_weights=/x/w.pt"])
    assert cfg.model.levels == [5] and cfg.optim.lr == 0.5 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.data.random_flip is False and cfg.model.backbone_weights == "/x/w.pt"


@pytest.mark.parametrize("override, fragment", [
    ("train.epoch=3", "did you mean 'train.epochs'"),
    ("trian.epochs=3", "did you mean 'train.epochs'"),
    ("train.epochs=three", "train.epochs (from command line): expected int"),
    ("data.random_flip=3", "data.random_flip (from command line): expected bool"),
    ("model.levels=4", "model.levels (from command line): expected a list"),
    ("model.levels=[4, x]", "model.levels[1]"),
    ("model.head=deform", "model.head='deform' is not one of"),
    ("train.zero_stage=3", "train.zero_stage=3 is not one of [0, 1, 2]"),
    ("train.zero_stage=one", "train.zero_stage (from command line): expected int"),
    ("eval.box_decoding=boxes", "eval.box_decoding='boxes' is not one of ['map', 'expected_iou', 'scoremap', 'logitmap']"),
    ("model.levels=[3]", "model.levels=[3]"),
    ("model.levels=[4]", "need one entry per level"),
    ("train.epochs", "must look like section.key=value"),
    ("train=3", "train (from command line): expected a mapping"),
])
def test_cli_errors_name_key_and_source(override, fragment):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(None, [override])
    assert fragment in str(err.value)


def test_file_errors_name_the_file(tmp_path):
    bad = write(tmp_path, "exp.yaml", "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(C.ConfigError, match=r"unknown key 'optim.learning_rate' \(from .*exp.yaml\)"):
        C.load_config(bad, base=None)
    bad = write(tmp_path, "exp2.yaml", "optim:\n  lr: fast\n")
    with pytest.raises(C.ConfigError, match=r"optim.lr \(from .*exp2.yaml\): expected float"):
        C.load_config(bad, base=None)
    bad = write(tmp_path, "exp3.yaml", "optim: [1, 2\n")
    with pytest.raises(C.ConfigError, match="exp3.yaml: invalid YAML"):
        C.load_config(bad, base=None)
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load_config(tmp_path / "missing.yaml")
    bad = write(tmp_path, "exp4.yaml", "- 1\n- 2\n")
    with pytest.raises(C.ConfigError, match="top level must be a mapping"):
        C.load_config(bad, base=None)


def test_dump_load_round_trip(tmp_path):
    cfg = C.load_config(None, ["train.epochs=4", "model.levels=[5]", "model.kernel_sizes=[3]",
                               "model.paddings=[1]", "log.tracking_uri=http://127.0.0.1:5000"])
    path = C.save_config(cfg, tmp_path / "config.yaml")
    again = C.load_config(path, base=None)
    assert again == cfg
    assert C.config_hash(again) == C.config_hash(cfg)
    assert C.config_hash(C.load_config(None, ["model.num_classes=10"])) != C.config_hash(cfg)


def test_parsing_has_no_side_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    C.load_config(BASE, ["train.out_dir=runs/x"])
    assert list(tmp_path.iterdir()) == []


def test_every_shipped_config_resolves():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        C.load_config(path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cstn.config", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_exit_2_names_key_and_suggestion():
    res = run_cli("--config", "configs/base.yaml", "train.epoch=3", "--print")
    assert res.returncode == 2
    assert "train.epoch" in res.stderr and "train.epochs" in res.stderr and "command line" in res.stderr


def test_cli_print_is_yaml_of_resolved_config():
    res = run_cli("--config", "configs/base.yaml", "train.epochs=3", "--print")
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout)["train"]["epochs"] == 3


def test_base_yaml_is_what_describe_writes():
    res = run_cli("--describe")
    assert res.returncode == 0
    assert res.stdout == BASE.read_text()


def test_literal_fields_are_the_allowed_values():
    """Each ``Literal`` field: its default is allowed, every allowed value survives a YAML round trip
    through the command line, and a value outside it is refused."""
    allowed = C.choices()
    assert {"data.backend", "model.arch", "train.zero_stage", "eval.box_decoding"} <= set(allowed)
    for key, values in allowed.items():
        section, name = key.split(".")
        assert getattr(getattr(C.Config(), section), name) in values, key
        with pytest.raises(C.ConfigError, match="is not one of"):
            C.load_config(None, [f"{key}={values[0]}x" if isinstance(values[0], str) else f"{key}={max(values) + 1}"])
