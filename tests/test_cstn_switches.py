"""The CSTN switches of issue 14 (the authors' recipe and the variants), each on hand-made inputs.

Every switch is checked against a value computed by hand or against a second computation that
does not share the code under test (a plain conv, a gradient probe, a brute-force loop).
"""
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cstn.inference import expected_iou_choice, location_score_maps, predict, window_score_maps
from cstn.config import ConfigError, LossConfig, load_config
from cstn.evaluation import normalised_class_maps
from cstn.losses import compute_loss, scale_loss, theta_loss
from cstn.models import build_model
from cstn.models.cstn_head import LevelHead
from cstn.models.geometry import CellMap, identity_theta
from cstn.models.output import ModelOutput
from cstn.optim import build_optimizer
from cstn.params import freeze, param_groups

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
GRIDS = ((4, 2, 2), (5, 1, 1))


def tiny(*overrides):
    return load_config(TINY, list(overrides))


def quiet_build(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(cfg)


def images(batch=2, size=64, seed=0):
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def cstn_output(logits, theta=None, boxes=None, grids=GRIDS, mix=None):
    batch, _, locations = logits.shape
    level = torch.cat([torch.full((h * w,), lv) for lv, h, w in grids])
    boxes = torch.zeros(batch, locations, 4) if boxes is None else boxes
    return ModelOutput(kind="cstn", logits=logits, theta=identity_theta(batch, locations) if theta is None else theta,
                       boxes=boxes, ref_boxes=boxes, level=level, grids=grids, mix=mix)


# -- loss ---------------------------------------------------------------------------------------

def test_regularisers_summed_over_the_batch_as_the_authors():
    theta = identity_theta(2, 5).clone()
    theta[0, 1, 0, 2] += 0.1
    theta[0, 1, 1, 1] += 0.2
    theta[1, 3, 0, 1] -= 0.3
    # per image 0.05 and 0.09: the batch sum is 0.14 (the mean 0.07)
    torch.testing.assert_close(theta_loss(theta, "sum", "sum"), torch.tensor(0.14))
    logits = torch.full((2, 2, 5), -1e4, dtype=torch.float64)
    logits[:, 0] = torch.log(torch.tensor([0.30, 0.05, 0.05, 0.05, 0.15], dtype=torch.float64))
    logits[:, 1, 0] = math.log(0.40)
    # both images: P4 best 0.30, P5 0.15 -> hinge 0.15 each; sum 0.30
    hinge = scale_loss(logits, GRIDS, torch.tensor([0, 0]), "sum")
    torch.testing.assert_close(hinge, torch.tensor(0.30, dtype=torch.float64))
    losses = compute_loss(cstn_output(logits, theta.double()), torch.tensor([0, 0]),
                          LossConfig(theta_lambda=1.0, scale_alpha=1.0, reg_batch_reduction="sum"))
    torch.testing.assert_close(losses["theta"], torch.tensor(0.14, dtype=torch.float64))
    torch.testing.assert_close(losses["scale"], hinge)


def test_level_hinge_on_the_predicted_class():
    # class 1 is predicted (mass 0.60, all on P5: no hinge); the label 0 has its best location on P4
    logits = torch.full((1, 2, 5), -1e4, dtype=torch.float64)
    logits[0, 0, 0], logits[0, 0, 4] = math.log(0.30), math.log(0.10)
    logits[0, 1, 4] = math.log(0.60)
    label = torch.tensor([0])
    by_label = compute_loss(cstn_output(logits), label, LossConfig(scale_class="label"))["scale"]
    by_prediction = compute_loss(cstn_output(logits), label, LossConfig(scale_class="predicted"))["scale"]
    assert by_label.item() == pytest.approx(0.20) and by_prediction.item() == pytest.approx(0.0, abs=1e-12)


def test_cutmix_mixes_the_cstn_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    labels = torch.tensor([0, 2])
    mixed = compute_loss(cstn_output(logits, mix=(torch.tensor([1, 0]), 0.25)), labels, LossConfig())["cls"]
    log_pc = torch.logsumexp(logits, 2) - torch.logsumexp(logits.flatten(1), 1, keepdim=True)
    by_hand = 0.25 * -(log_pc[0, 0] + log_pc[1, 2]) / 2 + 0.75 * -(log_pc[0, 2] + log_pc[1, 0]) / 2
    torch.testing.assert_close(mixed, by_hand)


# -- model ----------------------------------------------------------------------------------------

def test_shared_classifier_serves_every_level():
    model = quiet_build(tiny("model.shared_classifier=true")).eval()
    assert all(head.classifier is None for head in model.heads.values())
    x = images()
    with torch.no_grad():
        out = model(x)
        pyramid = model.neck(*model.backbone(model.normaliser(x, like=model.backbone.conv1.weight)))
        for level, (lv, h, w) in zip(model.levels, out.grids):
            features, _ = model.heads[f"p{level}"](pyramid[level])
            by_hand = F.conv2d(features, model.classifier.weight, model.classifier.bias).flatten(2)
            first = sum(gh * gw for l2, gh, gw in out.grids if l2 < lv)
            torch.testing.assert_close(out.logits[:, :, first:first + h * w], by_hand)
    names = [n for n, _ in model.named_parameters() if "classifier" in n]
    assert names == ["classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("style,reach", [("kxk_1x1", 1), ("authors", 2)])
def test_theta_reads_k_or_2k_minus_1_cells(style, reach):
    """Gradient probe: theta at the centre location depends on cells up to (k-1)/2 (kxk_1x1) or
    k-1 (authors) away, and on nothing further."""
    torch.manual_seed(0)
    head = LevelHead(4, 4, 3, 3, 1, loc_hidden=5, loc_net=style).double()
    torch.nn.init.normal_(head.loc.to_theta.weight)
    features = torch.randn(1, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    _, theta = head(features)
    theta[0, 4 * 9 + 4].sum().backward()                     # location (4, 4), the centre cell
    touched = features.grad[0].abs().sum(0) > 0
    rows, cols = torch.nonzero(touched, as_tuple=True)
    assert rows.min() == 4 - reach and rows.max() == 4 + reach and cols.min() == 4 - reach and cols.max() == 4 + reach
    if style == "authors":
        assert head.loc.to_theta.bias is None and head.loc.to_theta.kernel_size == (3, 3)


def test_taps_span_moves_in_half_tap_units():
    """window_span=taps (the authors'): theta02 = 1 moves the k = 5 taps (k-1)/2 = 2 cells; cells: 2.5."""
    torch.manual_seed(0)
    head = LevelHead(3, 4, 2, 5, 2, loc_hidden=4, window_span="taps").double()
    with torch.no_grad():
        head.loc.to_theta.bias.copy_(torch.tensor([0.0, 0, 1.0, 0, 0, 0]))
    features = torch.randn(1, 3, 6, 8, dtype=torch.float64)
    hidden = head.classifier
    head.classifier = None
    moved, _ = head(features)
    head.classifier = hidden
    wider = F.pad(features, (2, 2 + 2, 2, 2))
    expected = F.relu(F.conv2d(wider, head.filter_bank.weight, head.filter_bank.bias))[..., 2:]
    torch.testing.assert_close(moved, expected, rtol=1e-10, atol=1e-10)
    # and the box: a level of stride 16, window k = 5 spans the taps: half side 2 cells = 32 px
    model = quiet_build(tiny("model.levels=[4]", "model.kernel_sizes=[3]", "model.paddings=[1]",
                             "model.window_span=taps"))
    out = model(images())
    widths = out.ref_boxes[0, 5, 2] - out.ref_boxes[0, 5, 0]          # location (1, 1): not clipped
    assert widths.item() == pytest.approx(32.0)


def test_balanced_level_prior_offsets_each_level_by_its_log_size():
    plain = quiet_build(tiny()).eval()
    balanced = quiet_build(tiny("model.level_prior=balanced")).eval()
    balanced.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = plain(images()), balanced(images())
    offsets = torch.cat([torch.full((h * w,), math.log(h * w)) for _, h, w in a.grids])
    torch.testing.assert_close(b.logits, a.logits - offsets)
    # equal prior mass: with all logits equal, each level holds half of p
    flat = torch.zeros_like(a.logits) - offsets
    p = torch.softmax(flat.flatten(1), 1).view_as(flat).sum(1)
    sizes = [h * w for _, h, w in a.grids]
    assert [float(part.sum(1)[0]) for part in p.split(sizes, dim=1)] == pytest.approx([0.5, 0.5])


def test_authors_neck_has_no_p5_smoothing_and_no_extra_relu():
    model = quiet_build(tiny("model.extra_relu=false", "model.p5_smooth=false", "model.fpn_upsample=bilinear")).eval()
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.neck.extra)
    c4, c5 = model.backbone(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        pyramid = model.neck(c4, c5)
        p5 = model.neck.fpn.inner_blocks[-1](model.neck.extra[1](model.neck.extra[0](c5)))
        torch.testing.assert_close(pyramid[5], p5)
        top_down = F.interpolate(p5, size=c4.shape[-2:], mode="bilinear", align_corners=False)
        p4 = model.neck.fpn.layer_blocks[0](model.neck.fpn.inner_blocks[0](c4) + top_down)
        torch.testing.assert_close(pyramid[4], p4)


def test_input_methods_change_training_inputs_only():
    hidden = quiet_build(tiny("model.input_method=has", "model.has_hide_prob=1.0", "model.has_grid=2"))
    mean_image = quiet_build(tiny())
    mean_image.load_state_dict(hidden.state_dict())
    grey = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255       # the normalised zero image
    torch.manual_seed(0)
    hidden.train(), mean_image.train()
    out = hidden(images())
    torch.manual_seed(0)
    ref = mean_image(grey.expand(2, 3, 64, 64))
    torch.testing.assert_close(out.logits, ref.logits)
    hidden.eval(), mean_image.eval()
    with torch.no_grad():
        torch.testing.assert_close(hidden(images()).logits, mean_image(images()).logits)
    mixer = quiet_build(tiny("model.input_method=cutmix")).train()
    torch.manual_seed(3)
    assert mixer(images(batch=4)).mix is not None
    assert mixer.eval()(images(batch=4)).mix is None


def test_new_switches_are_validated_with_their_keys():
    with pytest.raises(ConfigError, match="model.input_method"):
        tiny("model.arch=cam", "model.input_method=has")
    with pytest.raises(ConfigError, match="model.loc_net=authors needs odd"):
        tiny("model.loc_net=authors", "model.kernel_sizes=[4,1]")
    with pytest.raises(ConfigError, match="model.window_span=taps"):
        tiny("model.window_span=taps")                                    # tiny's P5 window is k = 1
    with pytest.raises(ConfigError, match="eval.box_decoding"):
        tiny("eval.box_decoding=mean")


# -- optimizer ------------------------------------------------------------------------------------

def test_frozen_prefixes_and_weight_decay_switches():
    cfg = tiny("optim.name=sgd", "optim.weight_decay=0.1", "model.shared_classifier=true",
               "optim.frozen=[backbone.conv1., backbone.bn1., backbone.layer1., neck.fpn., classifier.]",
               "optim.no_decay=[heads.]", "optim.decay_norm_bias=true")
    model = quiet_build(cfg)
    build_optimizer(model, cfg)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1.", "neck.fpn.",
                                        "classifier.")) for n in frozen)
    assert "backbone.layer2.0.conv1.weight" not in frozen and "neck.extra.0.weight" not in frozen
    groups = param_groups(model, cfg.optim)
    by_id = {id(p): g for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert all(id(params[n]) not in by_id for n in frozen)
    assert by_id[id(params["heads.p4.filter_bank.weight"])]["weight_decay"] == 0.0     # no decay on the heads
    assert by_id[id(params["backbone.layer2.0.bn1.bias"])]["weight_decay"] == 0.1      # norms and biases decay
    with pytest.raises(ValueError, match="optim.frozen: 'nonexistent.'"):
        freeze(model, ["nonexistent."])


# -- decoding -------------------------------------------------------------------------------------

def test_expected_iou_prefers_the_box_many_windows_agree_on():
    # A alone holds 0.4; B and C (IoU 1/3... computed below) share 0.6: MAP picks A, voting picks B or C
    boxes = torch.tensor([[[0.0, 0, 10, 10], [50, 50, 80, 80], [60, 50, 90, 80]]])
    log_p = torch.log(torch.tensor([[0.4, 0.31, 0.29]]))
    iou_bc = (20 * 30) / (2 * 900 - 20 * 30)                           # 0.5
    votes = [0.4, 0.31 + 0.29 * iou_bc, 0.29 + 0.31 * iou_bc]           # 0.4, 0.455, 0.445
    assert int(np.argmax(votes)) == 1
    _, index = expected_iou_choice(log_p, boxes)
    assert index.tolist() == [1]
    logits = torch.full((1, 2, 3), -30.0)
    logits[0, 0] = log_p[0]
    out = ModelOutput(kind="cstn", logits=logits, theta=identity_theta(1, 3), boxes=boxes, ref_boxes=boxes + 1,
                      level=torch.tensor([4, 4, 5]), grids=((4, 1, 2), (5, 1, 1)))
    assert predict(out, torch.tensor([0])).gt_known_location.tolist() == [0]
    voted = predict(out, torch.tensor([0]), decoding="expected_iou")
    assert voted.gt_known_location.tolist() == [1] and voted.top1_location.tolist() == [1]
    torch.testing.assert_close(voted.gt_known_ref_box[0], boxes[0, 1] + 1)


def test_window_score_map_by_hand():
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 2.0], [1.0, 0.5, 3.0, 2.5]]])
    log_p = torch.log(torch.tensor([[0.75, 0.25]]))
    raw = np.zeros((3, 4))
    raw[0:2, 0:2] += 0.75
    raw[0, 1:3] += 0.25 * 0.5                                         # row 0 covered from y 0.5: half
    raw[1, 1:3] += 0.25
    raw[2, 1:3] += 0.25 * 0.5
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    got = window_score_maps(log_p, boxes, (3, 4))[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_cam_maps_aligned_with_where_cells_look():
    """One hot cell c of a stride-16 map: cv2.resize-style upsampling peaks at 16 (c + 0.5), the aligned
    one at 16 c + 0.5 (pixel 16 c), the half-cell bias of Choe et al.'s protocol."""
    cams = torch.zeros(1, 1, 7, 7)
    cams[0, 0, 3, 2] = 1.0
    resized = normalised_class_maps(cams, torch.tensor([0]), 112)[0]
    aligned = normalised_class_maps(cams, torch.tensor([0]), 112, CellMap(stride=16, offset=0.5))[0]
    peak = lambda m: divmod(int(m.argmax()), 112)
    assert peak(aligned) == (48, 32)
    row, col = peak(resized)
    assert row in (55, 56) and col in (39, 40)


def test_location_score_map_by_hand():
    """Two levels: a 2x2 grid with window centres at 8.5 and 24.5 px and a 1x1 grid; 32 px map."""
    grids = ((4, 2, 2), (5, 1, 1))
    centres = torch.tensor([[8.5, 8.5], [24.5, 8.5], [8.5, 24.5], [24.5, 24.5], [16.5, 16.5]])
    out = ModelOutput(kind="cstn", logits=torch.zeros(1, 1, 5), level=torch.tensor([4, 4, 4, 4, 5]),
                      grids=grids, centres=centres)
    log_p = torch.tensor([[0.0, 4.0, 2.0, 6.0, -1.0]])
    p4 = location_score_maps(log_p, out, (32, 32), levels=[4])[0]
    # P4 values 0 4 / 2 6, min-max -> 0 2/3 / 1/3 1; pixel x (centre x + 0.5) reads column (x - 8) / 16
    assert p4[0, 0].item() == pytest.approx(0.0) and p4[31, 31].item() == pytest.approx(1.0)      # clamped corners
    assert p4[8, 16].item() == pytest.approx((16 - 8) / 16 * 2 / 3, abs=1e-6)                      # row 0, between columns
    assert p4[16, 8].item() == pytest.approx((16 - 8) / 16 * 1 / 3, abs=1e-6)                      # column 0, between rows
    both = location_score_maps(log_p, out, (32, 32))[0]                                          # P5 is constant: 0 after min-max
    torch.testing.assert_close(both, p4)
    with pytest.raises(ValueError, match="logitmap_levels"):
        location_score_maps(log_p, out, (32, 32), levels=[3])
