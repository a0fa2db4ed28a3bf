"""Joint distribution and losses against brute force and hand examples; float32 under bf16 autocast."""
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cstn.config import LossConfig, load_config
from cstn.losses import compute_loss, scale_loss, theta_loss
from cstn.models import build_model
from cstn.models.geometry import identity_theta
from cstn.models.output import ModelOutput, class_log_probs, joint_log_probs

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
GRIDS = ((4, 2, 2), (5, 1, 1))      # 4 locations on P4, 1 on P5


def cstn_output(logits, theta=None, grids=GRIDS):
    batch, _, locations = logits.shape
    level = torch.cat([torch.full((h * w,), lv) for lv, h, w in grids])
    boxes = torch.zeros(batch, locations, 4)
    return ModelOutput(kind="cstn", logits=logits, theta=identity_theta(batch, locations) if theta is None else theta,
                       boxes=boxes, ref_boxes=boxes, level=level, grids=grids)


def test_log_pc_equals_brute_force_softmax_over_classes_and_locations():
    torch.manual_seed(0)
    logits = 3 * torch.randn(4, 6, 5, dtype=torch.float64)
    brute = torch.zeros(4, 6, dtype=torch.float64)
    for b in range(4):
        flat = logits[b].reshape(-1)
        probs = torch.exp(flat - flat.max()) / torch.exp(flat - flat.max()).sum()
        brute[b] = probs.reshape(6, 5).sum(1)
    torch.testing.assert_close(class_log_probs(logits), brute.log())
    joint = joint_log_probs(logits).exp()
    torch.testing.assert_close(joint.sum(dim=(1, 2)), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(joint, torch.softmax(logits.flatten(1), 1).view_as(logits))


def test_classification_loss_is_nll_of_the_marginal():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 5)
    labels = torch.tensor([0, 2, 3])
    losses = compute_loss(cstn_output(logits), labels, LossConfig())
    marginal = torch.softmax(logits.flatten(1), 1).view(3, 4, 5).sum(2)
    torch.testing.assert_close(losses["cls"], -marginal[torch.arange(3), labels].log().mean())


def test_theta_loss_by_hand():
    theta = identity_theta(2, 5).clone()
    assert theta_loss(theta) == 0
    theta[0, 1, 0, 2] += 0.1          # image 0: one location translated by 0.1 and scaled by 1.2
    theta[0, 1, 1, 1] += 0.2
    theta[1, 3, 0, 1] -= 0.3          # image 1: one location sheared by -0.3
    # per image sums: 0.01 + 0.04 = 0.05 and 0.09; batch mean 0.07; per-location mean divides by 5
    torch.testing.assert_close(theta_loss(theta, "sum"), torch.tensor(0.07))
    torch.testing.assert_close(theta_loss(theta, "mean"), torch.tensor(0.07 / 5))
    with pytest.raises(ValueError, match="theta_reduction"):
        theta_loss(theta, "max")


def test_scale_loss_by_hand():
    # p over (C=2) x (L=5): put the mass where we want it and compute the hinge by hand.
    logits = torch.full((1, 2, 5), -1e4, dtype=torch.float64)
    logits[0, 0, :5] = torch.log(torch.tensor([0.30, 0.05, 0.05, 0.05, 0.15], dtype=torch.float64))
    logits[0, 1, 0] = math.log(0.40)
    labels = torch.tensor([0])
    # class 0: best P4 location 0.30, best P5 location 0.15 -> hinge 0.15
    torch.testing.assert_close(scale_loss(logits, GRIDS, labels), torch.tensor(0.15, dtype=torch.float64))
    # the coarser level wins -> zero
    logits[0, 0, 4] = math.log(0.35)
    logits[0, 0, 0] = math.log(0.10)
    assert scale_loss(logits, GRIDS, labels).item() == pytest.approx(0.0, abs=1e-12)
    # class 1 (mass 0.40 on P4, nothing on P5): hinge 0.40 - 0
    torch.testing.assert_close(scale_loss(logits, GRIDS, torch.tensor([1])), torch.tensor(0.40, dtype=torch.float64),
                               atol=1e-9, rtol=0)
    # a single level has no pair: zero
    assert scale_loss(logits[:, :, :4], ((4, 2, 2),), labels).item() == 0.0


def test_total_loss_weights_the_terms():
    torch.manual_seed(2)
    theta = identity_theta(2, 5).clone() + 0.1 * torch.randn(2, 5, 2, 3)
    output = cstn_output(torch.randn(2, 3, 5), theta)
    cfg = LossConfig(theta_lambda=0.5, theta_reduction="mean", scale_alpha=3.0)
    losses = compute_loss(output, torch.tensor([1, 2]), cfg)
    assert set(losses) == {"loss", "cls", "theta", "scale"}
    torch.testing.assert_close(losses["loss"], losses["cls"] + 0.5 * losses["theta"] + 3.0 * losses["scale"])
    torch.testing.assert_close(losses["theta"], theta_loss(theta, "mean"))


def test_cam_loss_is_cross_entropy():
    logits = torch.randn(3, 4)
    output = ModelOutput(kind="cam", logits=logits, cams=torch.randn(3, 4, 2, 2))
    labels = torch.tensor([3, 0, 1])
    losses = compute_loss(output, labels, LossConfig(theta_lambda=1.0, scale_alpha=1.0))
    torch.testing.assert_close(losses["loss"], F.cross_entropy(logits, labels))
    assert set(losses) == {"loss", "cls"}          # CAM has no theta and no level hinge: nothing logged for them


def test_bad_labels_name_the_range():
    with pytest.raises(ValueError, match="num_classes"):
        compute_loss(cstn_output(torch.randn(2, 3, 5)), torch.tensor([0, 3]), LossConfig())


def test_joint_softmax_stays_float32_under_bf16_autocast():
    logits = (10 * torch.randn(2, 5, 7)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        joint = joint_log_probs(logits)
        marginal = class_log_probs(logits)
    assert joint.dtype == torch.float32 and marginal.dtype == torch.float32
    torch.testing.assert_close(joint, joint_log_probs(logits.float()))
    torch.testing.assert_close(marginal.exp().sum(1), torch.ones(2))


def test_model_under_bf16_autocast_is_finite_and_float32():
    cfg = load_config(TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg)
    torch.manual_seed(0)
    for head in model.heads.values():      # a non-identity theta so sampling really happens
        torch.nn.init.normal_(head.loc.to_theta.weight, std=0.05)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(images)
        losses = compute_loss(output, torch.tensor([0, 3]), cfg.loss)
    for name in ("logits", "theta", "boxes", "ref_boxes"):
        tensor = getattr(output, name)
        assert tensor.dtype == torch.float32, name
        assert torch.isfinite(tensor).all(), name
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
