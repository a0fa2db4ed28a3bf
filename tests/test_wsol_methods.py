"""The comparison methods' distinctive operations on hand-made inputs, and each model end to end (one step)."""

from __future__ import annotations

import math

import pytest
import torch

from cstn.config import load_config
from cstn.losses import compute_loss
from cstn.models import CAMModel, build_model
from cstn.models.wsol_methods import (ACoLModel, ADLayer, cutmix_images, erase_confident, guidance_mask,
                                      hide_patches, masked_bce, normalise_maps)

METHODS = ["has", "acol", "spg", "adl", "cutmix"]


def tiny_cfg(arch: str, *overrides: str):
    return load_config("configs/synthetic_cam.yaml", [f"model.arch={arch}", "model.width=0.25",
                                                      "data.image_size=64", *overrides])


# -- Hide-and-Seek ------------------------------------------------------------------------------

def test_has_hides_whole_cells_and_nothing_else():
    images = torch.arange(1, 2 * 3 * 10 * 10 + 1, dtype=torch.float32).reshape(2, 3, 10, 10)
    out, hidden = hide_patches(images, grid=3, hide_prob=0.5, generator=torch.Generator().manual_seed(3))
    assert hidden.shape == (2, 3, 3) and hidden.any() and not hidden.all()
    edges = [0, 4, 7, 10]  # cell i covers rows/cols [ceil(i*10/3), ceil((i+1)*10/3))
    for b in range(2):
        for i in range(3):
            for j in range(3):
                cell = out[b, :, edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
                original = images[b, :, edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
                if hidden[b, i, j]:
                    assert torch.all(cell == 0), (b, i, j)
                else:
                    assert torch.equal(cell, original), (b, i, j)


def test_has_hides_cells_with_the_configured_probability():
    images = torch.ones(200, 3, 8, 8)
    for prob in (0.0, 0.3, 1.0):
        _, hidden = hide_patches(images, grid=4, hide_prob=prob, generator=torch.Generator().manual_seed(0))
        n = hidden.numel()  # 3,200 independent cells
        rate = hidden.float().mean().item()
        assert abs(rate - prob) <= 4 * math.sqrt(prob * (1 - prob) / n) + 1e-9, (prob, rate)


def test_has_rejects_bad_settings():
    with pytest.raises(ValueError, match="model.has_hide_prob"):
        hide_patches(torch.zeros(1, 3, 4, 4), grid=2, hide_prob=1.5)
    with pytest.raises(ValueError, match="model.has_grid"):
        hide_patches(torch.zeros(1, 3, 4, 4), grid=0, hide_prob=0.5)


# -- CutMix ---------------------------------------------------------------------------------------

def test_cutmix_pastes_one_box_and_lam_is_the_kept_area():
    torch.manual_seed(5)
    images = torch.arange(4, dtype=torch.float32)[:, None, None, None].expand(4, 3, 16, 16).clone()
    mixed, perm, lam, (x0, y0, x1, y1) = cutmix_images(images, beta=1.0, prob=1.0)
    assert perm is not None and 0.0 < lam < 1.0
    for b in range(4):
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.all(mixed[b][:, inside] == images[perm[b]][:, inside])
        assert torch.all(mixed[b][:, ~inside] == images[b][:, ~inside])
    assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 256)


def test_cutmix_probability_zero_leaves_the_batch_alone():
    images = torch.randn(3, 3, 8, 8)
    mixed, perm, lam, box = cutmix_images(images, beta=1.0, prob=0.0)
    assert mixed is images and perm is None and lam == 1.0 and box is None


def test_cutmix_loss_mixes_the_two_labels_by_area():
    from cstn.models.output import ModelOutput

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    perm, lam = torch.tensor([1, 0]), 0.3
    out = ModelOutput(kind="cam", logits=logits, mix=(perm, lam))
    cfg = load_config(None, [])
    loss = compute_loss(out, labels, cfg.loss)["loss"]
    ce = torch.nn.functional.cross_entropy
    assert loss.item() == pytest.approx(lam * ce(logits, labels).item() + (1 - lam) * ce(logits, labels[perm]).item())


# -- ACoL -----------------------------------------------------------------------------------------

def test_acol_erases_exactly_at_and_above_the_threshold():
    attention = torch.tensor([[[[0.0, 0.69, 0.7], [0.71, 1.0, 0.2]]]])
    features = torch.full((1, 2, 2, 3), 5.0)
    erased = erase_confident(features, attention, threshold=0.7)
    keep = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.equal(erased, features * keep)


def test_acol_branch_b_sees_the_features_erased_where_a_is_confident():
    cfg = tiny_cfg("acol", "model.acol_threshold=0.5")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert isinstance(model, ACoLModel)
    seen = {}
    model.classifier_b.register_forward_hook(lambda m, inp, out: seen.update(b_input=inp[0].detach()))
    model.classifier.register_forward_hook(lambda m, inp, out: seen.update(a_input=inp[0].detach(), a_maps=out.detach()))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([3, 7])
    out = model(images, labels=labels)
    attention = normalise_maps(seen["a_maps"][torch.arange(2), labels][:, None])
    expected = seen["a_input"] * (attention < 0.5)
    assert torch.equal(seen["b_input"], expected)
    assert (attention >= 0.5).any()
    assert set(out.aux_losses) == {"acol_b"}
    model.eval()
    with torch.no_grad():
        fused = model(images)
    # eval map = max of the two normalised maps, B erased with the top-1 class
    top1 = seen["a_maps"].mean(dim=(2, 3)).argmax(1)
    attention = normalise_maps(seen["a_maps"][torch.arange(2), top1][:, None])
    assert torch.equal(seen["b_input"], seen["a_input"] * (attention < 0.5))
    maps_b = model.classifier_b(seen["b_input"])
    assert torch.allclose(fused.cams, torch.maximum(normalise_maps(seen["a_maps"]), normalise_maps(maps_b)))
    assert torch.allclose(fused.logits, seen["a_maps"].mean(dim=(2, 3)))  # class scores are A's


# -- SPG ------------------------------------------------------------------------------------------

def test_spg_guidance_marks_foreground_background_and_ignores_the_rest():
    attention = torch.tensor([[[[0.9, 0.7, 0.4], [0.05, 0.01, 0.0]]]])
    target, valid = guidance_mask(attention, high=0.7, low=0.05)
    assert torch.equal(target, torch.tensor([[[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]]))
    assert torch.equal(valid, torch.tensor([[[[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]]]))


def test_spg_guidance_falls_back_to_the_peak_without_foreground():
    attention = torch.tensor([[[[0.2, 0.3], [0.1, 0.0]]]])
    target, valid = guidance_mask(attention, high=0.7, low=0.05)
    assert torch.equal(target, torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]]))
    assert torch.equal(valid, torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]))


def test_spg_bce_ignores_pixels_outside_the_mask():
    target = torch.tensor([[[[1.0, 0.0, 0.0]]]])
    valid = torch.tensor([[[[1.0, 1.0, 0.0]]]])
    logits = torch.tensor([[[[2.0, -1.0, 9.0]]]])
    changed = logits.clone()
    changed[..., 2] = -9.0
    loss = masked_bce(logits, target, valid)
    assert loss.item() == pytest.approx(masked_bce(changed, target, valid).item())
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert loss.item() == pytest.approx(bce(logits[..., :2], target[..., :2]).item())


def test_spg_rejects_thresholds_out_of_order():
    with pytest.raises(ValueError, match="model.spg_thresholds"):
        build_model(tiny_cfg("spg", "model.spg_thresholds=[0.1,0.5,0.5,0.05,0.7,0.1]"))


# -- ADL ------------------------------------------------------------------------------------------

def test_adl_drop_mask_thresholds_attention_at_gamma_times_the_max():
    # channel mean = [[0, 1, 2], [8, 9, 10]] (max 10)
    mean = torch.tensor([[0.0, 1.0, 2.0], [8.0, 9.0, 10.0]])
    x = torch.stack([mean - 1, mean + 1])[None]
    layer = ADLayer(drop_rate=0.75, gamma=0.9)
    assert torch.equal(layer.drop_mask(x)[0, 0], torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
    layer.gamma = 0.8
    assert torch.equal(layer.drop_mask(x)[0, 0], torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(layer.importance_map(x)[0, 0], torch.sigmoid(mean))


def test_adl_picks_the_drop_mask_at_the_drop_rate_and_is_identity_in_eval():
    torch.manual_seed(0)
    layer = ADLayer(drop_rate=0.75, gamma=0.9).train()
    x = torch.rand(1, 4, 5, 5)
    choices = []
    for _ in range(2000):
        out = layer(x)
        choices.append(layer.last_choice)
        expected = x * (layer.drop_mask(x) if layer.last_choice == "drop" else layer.importance_map(x))
        assert torch.equal(out, expected)
    rate = choices.count("drop") / len(choices)
    assert abs(rate - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 2000), rate
    assert layer.eval()(x) is x


def test_adl_keeps_the_backbone_parameter_names():
    cam = build_model(tiny_cfg("cam"))
    adl = build_model(tiny_cfg("adl"))
    assert list(adl.state_dict()) == list(cam.state_dict())
    assert sum(isinstance(m, ADLayer) for m in adl.modules()) == 2


# -- every method, one training step and the evaluator's view ---------------------------------------

@pytest.mark.parametrize("arch", METHODS)
def test_method_trains_one_step_and_gives_class_maps(arch):
    torch.manual_seed(0)
    cfg = tiny_cfg(arch)
    model = build_model(cfg)
    assert isinstance(model, CAMModel)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    model.train()
    losses = compute_loss(model(images, labels=labels), labels, cfg.loss)
    assert torch.isfinite(losses["loss"])
    expected_terms = {"acol": {"acol_b"}, "spg": {"spg_b1", "spg_b2", "spg_c"}}.get(arch, set())
    assert expected_terms <= set(losses)
    assert losses["loss"].item() == pytest.approx(sum(losses[k].item() for k in ["cls", *expected_terms]), rel=1e-5)
    optimizer.zero_grad()
    losses["loss"].backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith(("classifier", "branch"))]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out.kind == "cam" and out.cams.shape == (4, 10, 4, 4) and out.logits.shape == (4, 10)
    assert not out.aux_losses and out.mix is None


@pytest.mark.parametrize("arch", ["acol", "spg"])
def test_methods_that_need_labels_say_so(arch):
    model = build_model(tiny_cfg(arch)).train()
    with pytest.raises(ValueError, match="needs the labels"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_bad_method_settings_name_the_key():
    with pytest.raises(ValueError, match="model.adl_gamma"):
        build_model(tiny_cfg("adl", "model.adl_gamma=1.5"))
    with pytest.raises(ValueError, match="model.cutmix_beta"):
        build_model(tiny_cfg("cutmix", "model.cutmix_beta=0"))
