"""The CSTN head: identity = plain conv, hand-computed transforms, implementations agree (float64)."""
import pytest
import torch
import torch.nn.functional as F

from cstn.models.cstn_head import SAMPLERS, LevelHead, sample_conv_reference
from cstn.models.geometry import offset_basis, output_grid_size, theta_to_offsets

IMPLS = ["fast", *SAMPLERS]
WINDOWS = [(3, 1), (3, 0), (5, 0), (4, 1), (1, 0), (5, 2)]


def make_head(k, p, transform=True, impl="reference", channels=5, head_channels=4, classes=3, seed=0):
    torch.manual_seed(seed)
    return LevelHead(channels, head_channels, classes, k, p, loc_hidden=6, transform=transform, impl=impl).double()


def set_constant_theta(head, theta):
    """Make the localisation net output a constant theta (weights 0, bias = theta - identity)."""
    residual = torch.as_tensor(theta, dtype=torch.float64).reshape(6) - torch.tensor([1.0, 0, 0, 0, 1, 0],
                                                                                      dtype=torch.float64)
    with torch.no_grad():
        head.loc.to_theta.weight.zero_()
        head.loc.to_theta.bias.copy_(residual)


def filter_bank_output(head, features):
    """The head's k x k filter-bank response, before ReLU and the class conv."""
    k, p = head.kernel_size, head.padding
    residual = head.loc(features)
    return sample_conv_reference(features, theta_to_offsets(residual, offset_basis(k)),
                                 head.filter_bank.weight, head.filter_bank.bias, p)


@pytest.mark.parametrize("k,p", WINDOWS)
@pytest.mark.parametrize("impl", IMPLS)
def test_identity_theta_is_plain_conv(k, p, impl):
    cstn = make_head(k, p, impl=impl)
    conv = make_head(k, p, transform=False)
    conv.load_state_dict(cstn.state_dict(), strict=False)       # same filter bank and classifier
    features = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    logits, theta = cstn(features)
    expected_logits, expected_theta = conv(features)
    out_h, out_w = output_grid_size(7, 6, k, p)
    assert logits.shape == (2, 3, out_h, out_w) and theta.shape == (2, out_h * out_w, 2, 3)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(theta, expected_theta.double(), rtol=0, atol=0)
    plain = F.conv2d(features, cstn.filter_bank.weight, cstn.filter_bank.bias, padding=p)
    torch.testing.assert_close(cstn.classifier(F.relu(plain)), logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,p", [(3, 1), (5, 0), (3, 0)])
def test_translation_by_one_cell_samples_the_shifted_map(k, p):
    """theta02 = 2/k moves every tap one cell right: location j reads what location j + 1 reads."""
    head = make_head(k, p)
    set_constant_theta(head, [[1, 0, 2 / k], [0, 1, 0]])
    features = torch.randn(1, 5, 6, 7, dtype=torch.float64)
    wider = F.pad(features, (p, p + 1, p, p))                     # one more zero column on the right
    expected = F.conv2d(wider, head.filter_bank.weight, head.filter_bank.bias)[..., 1:]
    torch.testing.assert_close(filter_bank_output(head, features), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k,p", [(3, 1), (3, 0), (5, 1)])
def test_scale_two_is_a_dilated_conv(k, p):
    """theta = 2 I spreads the taps two cells apart around the same centre: dilation 2."""
    head = make_head(k, p)
    set_constant_theta(head, [[2, 0, 0], [0, 2, 0]])
    features = torch.randn(1, 5, 8, 7, dtype=torch.float64)
    expected = F.conv2d(features, head.filter_bank.weight, head.filter_bank.bias, padding=p + (k - 1) // 2,
                        dilation=2)
    torch.testing.assert_close(filter_bank_output(head, features), expected, rtol=1e-10, atol=1e-10)


def test_half_cell_translation_averages_neighbours():
    """A 1x1 window moved half a cell right reads the mean of two horizontal neighbours (bilinear)."""
    head = make_head(1, 0, channels=1, head_channels=1)
    set_constant_theta(head, [[1, 0, 1.0], [0, 1, 0]])            # k/2 * 1.0 = 0.5 cell
    with torch.no_grad():
        head.filter_bank.weight.fill_(1.0)
        head.filter_bank.bias.zero_()
    features = torch.arange(12, dtype=torch.float64).reshape(1, 1, 3, 4)
    out = filter_bank_output(head, features)
    expected = features.clone()
    expected[..., :-1] = (features[..., :-1] + features[..., 1:]) / 2
    expected[..., -1] = features[..., -1] / 2                       # zeros outside the map
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("impl", ["fast", "im2col", "deform", "project"])
@pytest.mark.parametrize("k,p", [(3, 1), (5, 0), (4, 1)])
def test_fast_implementations_equal_reference_forward_and_backward(impl, k, p):
    features = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    out_h, out_w = output_grid_size(7, 6, k, p)
    residual = 0.3 * torch.randn(2, 6, out_h, out_w, dtype=torch.float64)
    weight = torch.randn(4, 5, k, k, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    cotangent = torch.randn(2, 4, out_h, out_w, dtype=torch.float64)
    basis = offset_basis(k)

    def run(name):
        inputs = [t.clone().requires_grad_() for t in (features, residual, weight, bias)]
        f, r, w, b = inputs
        out = SAMPLERS["im2col" if name == "fast" else name](f, theta_to_offsets(r, basis), w, b, p)
        grads = torch.autograd.grad((out * cotangent).sum(), inputs)
        return out, grads

    out_ref, grads_ref = run("reference")
    out, grads = run(impl)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for name, g, g_ref in zip(["features", "theta", "weight", "bias"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


def test_reference_gradcheck():
    """Analytic gradients of the reference sampling (incl. w.r.t. theta) match finite differences."""
    torch.manual_seed(1)
    k, p = 3, 1
    features = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    out_h, out_w = output_grid_size(4, 5, k, p)
    residual = (0.3 * torch.randn(1, 6, out_h, out_w, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(2, 2, k, k, dtype=torch.float64, requires_grad=True)
    basis = offset_basis(k)
    assert torch.autograd.gradcheck(
        lambda f, r, w: sample_conv_reference(f, theta_to_offsets(r, basis), w, None, p),
        (features, residual, weight), eps=1e-6, atol=1e-6)


def test_localisation_net_starts_at_identity_and_learns():
    head = make_head(3, 1)
    features = torch.randn(2, 5, 5, 5, dtype=torch.float64)
    logits, theta = head(features)
    torch.testing.assert_close(theta, torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=torch.float64).expand_as(theta))
    logits.square().sum().backward()
    assert head.loc.to_theta.weight.grad.abs().sum() > 0
    assert head.loc.to_theta.bias.grad.abs().sum() > 0


def test_conv_head_has_no_localisation_net():
    head = make_head(3, 1, transform=False)
    assert head.loc is None
    _, theta = head(torch.randn(1, 5, 4, 4, dtype=torch.float64))
    assert theta.shape == (1, 16, 2, 3)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_autocast_head_is_finite_and_theta_float32(impl):
    torch.manual_seed(0)
    head = LevelHead(8, 8, 3, 3, 1, loc_hidden=4, impl=impl)
    with torch.no_grad():
        head.loc.to_theta.weight.normal_(0, 0.1)
    features = torch.randn(2, 8, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, theta = head(features)
    assert theta.dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.isfinite(theta).all()
    reference, _ = head(features)
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.05)


def test_window_too_large_is_a_clear_error():
    head = make_head(5, 0)
    with pytest.raises(ValueError, match="does not fit"):
        head(torch.randn(1, 5, 3, 3, dtype=torch.float64))
