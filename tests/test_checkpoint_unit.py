"""Checkpoint bookkeeping without DeepSpeed: complete-only latest, pruning, compatibility, preflight."""
import json

import pytest
import torch

from cstn import checkpoint as ck
from cstn.config import config_hash, load_config, to_dict
from cstn.optim import lr_factor


def fake_checkpoint(root, step, cfg, complete=True):
    tag_dir = root / f"step{step:08d}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (tag_dir / ck.META).write_text(json.dumps({"tag": tag_dir.name, "step": step, "epoch": 0,
                                                    "config_hash": config_hash(cfg),
                                                    "model_config": to_dict(cfg.model)}))
    return tag_dir


def test_partial_checkpoint_never_resumed(tmp_path):
    cfg = load_config(None, [f"train.out_dir={tmp_path}"])
    root = ck.checkpoint_dir(cfg)
    good = fake_checkpoint(root, 10, cfg)
    (root / "latest").write_text(good.name)
    fake_checkpoint(root, 20, cfg, complete=False)  # killed while saving: no meta.json, latest not moved
    assert ck.find_resume(cfg, "auto") == good
    (root / "latest").write_text("step00000020")  # even a latest pointing at a partial one is not trusted
    assert ck.find_resume(cfg, "auto") == good
    assert ck.complete_tags(root) == [good.name]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ck.find_resume(cfg, str(root / "step00000020"))


def test_no_checkpoint_means_fresh_start(tmp_path):
    cfg = load_config(None, [f"train.out_dir={tmp_path}"])
    assert ck.find_resume(cfg, "auto") is None
    assert ck.find_resume(cfg, None) is None


def test_prune_keeps_last_k_latest_and_best(tmp_path):
    cfg = load_config(None, [f"train.out_dir={tmp_path}"])
    root = ck.checkpoint_dir(cfg)
    for step in (1, 2, 3, 4, 5):
        fake_checkpoint(root, step, cfg)
    (root / "best").write_text("step00000002")
    (root / "latest").write_text("step00000005")
    ck.prune(root, keep_last=2)
    assert ck.complete_tags(root) == ["step00000002", "step00000004", "step00000005"]


def test_mismatched_checkpoint_is_refused_naming_the_difference(tmp_path):
    cfg = load_config(None, [f"train.out_dir={tmp_path}", "model.num_classes=10"])
    tag = fake_checkpoint(ck.checkpoint_dir(cfg), 3, cfg)
    other = load_config(None, [f"train.out_dir={tmp_path}", "model.num_classes=4", "model.backbone=resnet18"])
    with pytest.raises(ck.CheckpointMismatch) as err:
        ck.check_compatible(other, ck.read_meta(tag), str(tag))
    msg = str(err.value)
    assert "model.num_classes: checkpoint 10 vs config 4" in msg
    assert "model.backbone: checkpoint 'resnet50' vs config 'resnet18'" in msg
    ck.check_compatible(cfg, ck.read_meta(tag), str(tag))  # same config: accepted


def test_preflight_out_of_space_named(tmp_path, monkeypatch):
    cfg = load_config(None, [f"train.out_dir={tmp_path}"])
    usage = type("U", (), {"free": 1024, "total": 2048, "used": 1024})
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage)
    with pytest.raises(RuntimeError, match=r"MiB free; checkpoints need about"):
        ck.preflight(cfg, torch.nn.Linear(512, 512))


def test_preflight_file_in_the_way_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = load_config(None, [f"train.out_dir={blocker}"])
    with pytest.raises(RuntimeError, match=f"{blocker}/checkpoints is not writable"):
        ck.preflight(cfg, torch.nn.Linear(2, 2))


def test_schedules():
    cfg = load_config(None, ["optim.warmup_steps=4", "optim.schedule=cosine"])
    f = [lr_factor(s, cfg, total_steps=14, steps_per_epoch=7) for s in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and abs(f[9] - 0.5) < 1e-12 and all(a >= b for a, b in zip(f[4:], f[5:]))
    cfg = load_config(None, ["optim.schedule=step", "optim.step_epochs=[1, 2]", "optim.gamma=0.1"])
    assert [lr_factor(s, cfg, 30, 10) for s in (0, 9, 10, 19, 20, 29)] == pytest.approx([1, 1, .1, .1, .01, .01])


def test_checkpoint_older_than_a_model_field_is_compared_with_its_default(tmp_path):
    """A checkpoint whose config predates a field (here ``model.acol_threshold``) was made with its default."""
    import json

    cfg = load_config(None, [f"train.out_dir={tmp_path}"])
    tag = fake_checkpoint(ck.checkpoint_dir(cfg), 3, cfg)
    meta = ck.read_meta(tag)
    del meta["model_config"]["acol_threshold"]
    meta["config_hash"] = "from an older version"
    (tag / "meta.json").write_text(json.dumps(meta))
    ck.check_compatible(cfg, ck.read_meta(tag), str(tag))  # default value: accepted
    changed = load_config(None, [f"train.out_dir={tmp_path}", "model.acol_threshold=0.5"])
    with pytest.raises(ck.CheckpointMismatch, match="model.acol_threshold: checkpoint 0.7 vs config 0.5"):
        ck.check_compatible(changed, ck.read_meta(tag), str(tag))


def test_checkpoint_from_before_the_aligned_fpn_is_a_nearest_one(tmp_path):
    """``model.fpn_upsample`` arrived with a new default ('aligned'); checkpoints without the field were
    trained with torchvision's nearest upsampling and must be loaded as such (LEGACY_MODEL_VALUES)."""
    cfg = load_config(None, [f"train.out_dir={tmp_path}"])
    tag = fake_checkpoint(ck.checkpoint_dir(cfg), 3, cfg)
    meta = ck.read_meta(tag)
    del meta["model_config"]["fpn_upsample"]
    meta["config_hash"] = "from before issue 14"
    (tag / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ck.CheckpointMismatch, match="model.fpn_upsample: checkpoint 'nearest' vs config 'aligned'"):
        ck.check_compatible(cfg, ck.read_meta(tag), str(tag))
    legacy = load_config(None, [f"train.out_dir={tmp_path}", "model.fpn_upsample=nearest"])
    ck.check_compatible(legacy, ck.read_meta(tag), str(tag))
