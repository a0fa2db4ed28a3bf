"""Model assembly: shapes for every backbone and level choice, weights, input handling, CAM, params, training."""
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from cstn.inference import predict
from cstn.config import load_config
from cstn.losses import compute_loss
from cstn.models import CAMModel, CSTNModel, build_model
from cstn.models.backbone import RANDOM_INIT_WARNING, build_trunk
from cstn.models.cstn_model import feature_size
from cstn.params import param_groups

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny(*overrides):
    return load_config(TINY, list(overrides))


def quiet_build(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(cfg)


def images(batch=2, size=64, seed=0):
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


LEVEL_CHOICES = [([4], [3], [1]), ([5], [1], [0]), ([4, 5], [3, 1], [1, 0]), ([5, 4], [1, 3], [0, 1])]


@pytest.mark.parametrize("levels,kernels,paddings", LEVEL_CHOICES)
@pytest.mark.parametrize("head", ["cstn", "conv"])
def test_shapes_for_every_level_choice(levels, kernels, paddings, head):
    cfg = tiny(f"model.levels={levels}", f"model.kernel_sizes={kernels}", f"model.paddings={paddings}",
               f"model.head={head}")
    output = quiet_build(cfg)(images())
    expected = {4: (4, 4), 5: (2, 2)}        # 64 px: P4 4x4 cells (k3 p1 -> 4x4), P5 2x2 (k1 -> 2x2)
    sizes = [expected[level][0] * expected[level][1] for level in sorted(levels)]
    locations = sum(sizes)
    assert output.kind == "cstn"
    assert output.logits.shape == (2, 4, locations) and output.logits.dtype == torch.float32
    assert output.theta.shape == (2, locations, 2, 3)
    assert output.boxes.shape == output.ref_boxes.shape == (2, locations, 4)
    assert output.level.dtype == torch.int64
    assert output.level.tolist() == sum(([lv] * n for lv, n in zip(sorted(levels), sizes)), [])
    assert [g[0] for g in output.grids] == sorted(levels)
    assert (output.ref_boxes >= 0).all() and (output.ref_boxes <= 64).all()
    # identity theta at initialisation: boxes are the reference windows, L_theta = 0
    torch.testing.assert_close(output.boxes, output.ref_boxes)
    assert compute_loss(output, torch.tensor([0, 1]), cfg.loss)["theta"] == 0


@pytest.mark.parametrize("backbone,width,channels", [
    ("resnet10", 0.25, (64, 128)), ("resnet10", 1.0, (256, 512)), ("resnet18", 0.25, (64, 128)),
    ("resnet34", 0.25, (64, 128)), ("resnet50", 0.25, (256, 512)), ("resnet101", 0.25, (256, 512)),
])
def test_every_backbone(backbone, width, channels):
    cfg = tiny(f"model.backbone={backbone}", f"model.width={width}")
    model = quiet_build(cfg)
    assert model.backbone.channels == channels
    assert not hasattr(model.backbone, "fc") and not hasattr(model.backbone, "avgpool")
    output = model(images(batch=1))
    assert output.logits.shape == (1, 4, 20)


def test_full_width_trunks_match_torchvision_layouts():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, factory in [("resnet18", torchvision.models.resnet18), ("resnet50", torchvision.models.resnet50)]:
            ours = build_trunk(name).state_dict()
            theirs = {k: v for k, v in factory().state_dict().items() if not k.startswith("fc.")}
            assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_resnet10_is_torchvision_resnet_with_one_block_per_stage():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trunk = build_trunk("resnet10", width=0.5)
    assert isinstance(trunk, torchvision.models.resnet.ResNet)
    assert [len(getattr(trunk, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert trunk.conv1.out_channels == 32 and trunk.channels == (128, 256)


def test_weights_from_a_local_torchvision_file(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)     # includes fc.*, as torchvision's files do
    cfg = tiny("model.backbone=resnet18", "model.width=1.0", f"model.backbone_weights={path}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # no random-init warning when weights are given
        model = build_model(cfg)
    for name, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name])


def test_mismatching_weights_name_the_file(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="wrong.pth"):
        build_model(tiny(f"model.backbone_weights={path}"))        # resnet10 at width 0.25
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_model(tiny(f"model.backbone_weights={tmp_path / 'missing.pth'}"))


def test_random_init_warns_once_per_build():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_model(tiny())
    messages = [str(w.message) for w in caught]
    assert messages == [RANDOM_INIT_WARNING]
    assert "ImageNet-pretrained" in messages[0]


def test_uint8_and_float_inputs_agree_and_bad_shapes_fail():
    model = quiet_build(tiny()).eval()
    batch = images()
    with torch.no_grad():
        a, b = model(batch), model(batch.float())
    torch.testing.assert_close(a.logits, b.logits)
    assert torch.equal(model.normaliser.pixel_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]) * 255)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))


def test_window_that_does_not_fit_is_rejected_at_build():
    with pytest.raises(ValueError, match="model.kernel_sizes"):
        quiet_build(tiny("model.kernel_sizes=[13,7]", "model.paddings=[0,0]"))
    assert feature_size(320, 4) == 20 and feature_size(112, 5) == 4 and feature_size(64, 4) == 4


def test_float64_model_matches_between_head_implementations():
    outputs = {}
    for impl in ("reference", "fast"):
        torch.manual_seed(0)
        model = quiet_build(tiny(f"model.head_impl={impl}")).double().eval()
        for head in model.heads.values():
            torch.nn.init.normal_(head.loc.to_theta.weight, std=0.05)
        outputs[impl] = model(images())
    torch.testing.assert_close(outputs["fast"].logits, outputs["reference"].logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs["fast"].boxes, outputs["reference"].boxes)
    assert outputs["fast"].logits.dtype == torch.float64


@pytest.mark.parametrize("last_stride,side", [(2, 2), (1, 4)])
def test_cam_model(last_stride, side):
    cfg = tiny("model.arch=cam", f"model.cam_last_stride={last_stride}")
    model = quiet_build(cfg)
    assert isinstance(model, CAMModel)
    output = model(images())
    assert output.kind == "cam" and output.theta is None and output.boxes is None
    assert output.cams.shape == (2, 4, side, side)
    torch.testing.assert_close(output.logits, output.cams.mean(dim=(2, 3)))
    preds = predict(output, torch.tensor([0, 1]))
    assert preds.topk_classes.shape == (2, 4) and preds.cams.shape == (2, 4, side, side)
    groups = param_groups(model, cfg.optim)
    assert {g["name"] for g in groups} == {"backbone", "backbone/no_decay", "new", "new/no_decay"}


def test_param_groups():
    cfg = tiny("optim.lr=0.1", "optim.backbone_lr_mult=0.5", "optim.theta_lr_mult=0.05", "optim.weight_decay=0.01")
    model = quiet_build(cfg)
    groups = param_groups(model, cfg.optim)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["backbone", "backbone/no_decay", "new", "new/no_decay", "theta", "theta/no_decay"]
    assert by_name["backbone"]["lr"] == pytest.approx(0.05)
    assert by_name["new"]["lr"] == pytest.approx(0.1)
    assert by_name["theta"]["lr"] == pytest.approx(0.005) and by_name["theta/no_decay"]["lr"] == pytest.approx(0.005)
    for name, group in by_name.items():
        if name.endswith("no_decay"):
            assert group["weight_decay"] == 0 and all(p.ndim == 1 for p in group["params"])
        else:
            assert group["weight_decay"] == 0.01 and all(p.ndim > 1 for p in group["params"])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    theta_ids = {id(p) for g in groups if g["name"].startswith("theta") for p in g["params"]}
    assert theta_ids == {id(p) for head in model.heads.values() for p in head.loc.parameters()}
    # the conv head has no theta layers; an optimizer accepts the groups as they are
    conv_groups = param_groups(quiet_build(tiny("model.head=conv")), cfg.optim)
    assert not any(g["name"].startswith("theta") for g in conv_groups)
    torch.optim.AdamW(groups)


def test_a_few_training_steps_fit_a_batch_and_move_theta():
    torch.manual_seed(0)
    cfg = tiny("loss.scale_alpha=1.0")
    model = quiet_build(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim))
    batch, labels = images(batch=4), torch.tensor([0, 1, 2, 3])
    first = None
    for _ in range(15):
        losses = compute_loss(model(batch), labels, cfg.loss)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        first = losses["cls"].item() if first is None else first
    assert losses["cls"].item() < first
    output = model(batch)
    assert compute_loss(output, labels, cfg.loss)["theta"] > 0          # theta left the identity
    assert not torch.equal(output.boxes, output.ref_boxes)
    assert isinstance(model, CSTNModel)


def test_boxes_follow_the_sampling_shift():
    """theta02 = 2/k moves the taps one cell right (tests/test_head.py); the box moves one stride."""
    cfg = tiny("model.levels=[4]", "model.kernel_sizes=[3]", "model.paddings=[1]")
    model = quiet_build(cfg)
    head = model.heads["p4"]
    with torch.no_grad():
        head.loc.to_theta.bias.copy_(torch.tensor([0.0, 0, 2 / 3, 0, 0, 0]))
    output = model(images())
    shifted = output.ref_boxes.clone()
    # cell j of a stride-16 ResNet level looks at pixel 16 j + 0.5 (tests/test_geometry.py probes it), so
    # the unclipped reference windows of the 4x4 grid are 16 j + 0.5 -+ 24; shifted by 16 px
    columns = torch.arange(4).repeat(4).float()
    expected_x1 = (16 * columns + 0.5 - 24 + 16).clamp(0, 64)
    expected_x2 = (16 * columns + 0.5 + 24 + 16).clamp(0, 64)
    torch.testing.assert_close(output.boxes[0, :, 0], expected_x1)
    torch.testing.assert_close(output.boxes[0, :, 2], expected_x2)
    torch.testing.assert_close(output.boxes[..., 1::2], shifted[..., 1::2])     # y unchanged
    torch.testing.assert_close(output.theta[0, 0], torch.tensor([[1.0, 0, 2 / 3], [0, 1, 0]]))


@pytest.mark.parametrize("impl", ["fast", "reference", "deform", "project"])
def test_bfloat16_parameters_run_with_float32_outputs(impl):
    """A bf16 engine (DeepSpeed bf16 casts the module) feeds uint8 images; outputs stay float32."""
    cfg = tiny(f"model.head_impl={impl}")
    torch.manual_seed(0)
    model = quiet_build(cfg).bfloat16()
    for head in model.heads.values():
        torch.nn.init.normal_(head.loc.to_theta.weight, std=0.05)
    output = model(images())
    assert output.logits.dtype == output.theta.dtype == output.boxes.dtype == torch.float32
    losses = compute_loss(output, torch.tensor([0, 1]), cfg.loss)
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
