"""Where the CSTN's boxes sit: the cell-to-pixel map against a receptive-field probe of the real network.

The probe does not restate the map's formula: it back-propagates from one cell of a pyramid level of
the network itself (uniform positive weights, BatchNorm as identity, a random positive input) to the
input pixels and takes the centroid of the gradient's magnitude. The model's reference box of the
window centred on that cell must be centred there.
"""
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from cstn.config import load_config
from cstn.models import build_model
from cstn.models.fpn import upsample_aligned
from cstn.models.geometry import derive_cell_maps, path_map

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def build(backbone, width, size, *overrides):
    cfg = load_config(TINY, [f"model.backbone={backbone}", f"model.width={width}", f"data.image_size={size}",
                             "model.kernel_sizes=[3,3]", "model.paddings=[1,1]", *overrides])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(cfg)


def uniform_(model: nn.Module) -> nn.Module:
    """Every conv averages its inputs (weight 1/fan-in, no bias); every BatchNorm is the identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, 1.0 / module.weight[0].numel())
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model.eval()


def gradient_centroid(model, size: int, level: int, row: int, col: int, seed: int = 0) -> tuple[float, float]:
    """(x, y) pixel centroid of |d sum_channels feature[level][row, col] / d input| (pixel n centred at n + 0.5)."""
    torch.manual_seed(seed)
    x = torch.rand(1, 3, size, size, requires_grad=True)
    features = model.neck(*model.backbone(x))[level]
    features[0, :, row, col].sum().backward()
    weight = x.grad[0].abs().sum(0).double()                                # (H, W)
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    return float((weight.sum(0) * centres).sum() / weight.sum()), float((weight.sum(1) * centres).sum() / weight.sum())


def box_centre(model, size: int, level: int, row: int, col: int) -> tuple[float, float]:
    """Centre of the model's reference box of the k=3, padding-1 window centred on cell (row, col)."""
    with torch.no_grad():
        out = model(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    (_, h, w), = [g for g in out.grids if g[0] == level]
    first = sum(gh * gw for lv, gh, gw in out.grids if lv < level)
    box = out.ref_boxes[0, first + row * w + col]
    return float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2


@pytest.mark.parametrize("backbone,width", [("resnet10", 0.5), ("resnet18", 0.25), ("resnet50", 0.25)])
@pytest.mark.parametrize("size", [512, 464])                 # 464 px: P5 15x15, not a multiple of 32
def test_boxes_are_centred_where_the_features_look(backbone, width, size):
    model = uniform_(build(backbone, width, size))
    for level in (4, 5):
        side = model.neck(*model.backbone(torch.zeros(1, 3, size, size)))[level].shape[-1]
        for row, col in [(side // 2, side // 2), (side // 2 - 1, side // 2 + 1)]:   # interior cells
            probe = gradient_centroid(model, size, level, row, col)
            box = box_centre(model, size, level, row, col)
            assert abs(probe[0] - box[0]) <= 2 and abs(probe[1] - box[1]) <= 2, (level, row, col, probe, box)


def test_the_probe_sees_the_old_half_cell_offset_and_torchvision_upsampling():
    """The probe is sensitive: it finds the naive map t (c + 0.5) 15.5 px off on P5, and P4's centre pulled
    about 8 px up-left by torchvision's nearest top-down upsampling (``model.fpn_upsample=nearest``)."""
    size = 512
    model = uniform_(build("resnet18", 0.25, size))
    probe = gradient_centroid(model, size, 5, 8, 8)
    assert abs(probe[0] - 32 * 8.5) > 12                    # the old map's P5 centre: 272
    legacy = uniform_(build("resnet18", 0.25, size, "model.fpn_upsample=nearest"))
    probe = gradient_centroid(legacy, size, 4, 16, 16)
    box = box_centre(legacy, size, 4, 16, 16)
    assert 4 < box[0] - probe[0] < 12 and 4 < box[1] - probe[1] < 12
    assert legacy.cell_maps[4].top_down_gap == -8.0 and model.cell_maps[4].top_down_gap == 0.0


def test_cell_maps_of_resnets_and_of_a_valid_conv():
    model = build("resnet50", 0.25, 112)
    maps = derive_cell_maps(model.backbone, model.neck)
    assert (maps[4].stride, maps[4].offset, maps[5].stride, maps[5].offset) == (16, 0.5, 32, 0.5)
    # by hand: a 3x3 stride-2 conv without padding centres output i on input 2 i + 1; a 7x7 one with
    # padding 1 then on 2 (2 i - 1 + 3) + 1
    assert path_map(nn.Conv2d(1, 1, 3, stride=2)) == (2.0, 1.0)
    assert path_map(nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.ReLU(), nn.Conv2d(1, 1, 7, stride=2, padding=1))) \
        == (4.0, 5.0)
    with pytest.raises(ValueError, match="non-square"):
        path_map(nn.Conv2d(1, 1, (3, 1)))


def test_aligned_upsampling_reads_half_cells():
    coarse = torch.tensor([0.0, 10.0, 20.0]).view(1, 1, 1, 3).expand(1, 1, 3, 3)
    odd = upsample_aligned(coarse, (5, 5))
    assert odd[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 15.0, 20.0]
    even = upsample_aligned(coarse, (6, 6))
    assert even[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 15.0, 20.0, 20.0]
    with pytest.raises(ValueError, match="2n-1 or 2n"):
        upsample_aligned(coarse, (8, 8))


def test_probe_tool_measures_centres_and_fits_a_line():
    """launch/probe_cell_maps.py: on a uniform network at 512 px the interior cells' measured centres
    sit on the analytic map, and the fitted line through hand-made centroids is exact."""
    import sys

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
    import probe_cell_maps as tool
    from pipeline.batch import Batch

    model = uniform_(build("resnet10", 0.25, 256))
    batch = Batch(images=torch.randint(1, 255, (1, 3, 256, 256), dtype=torch.uint8), labels=torch.zeros(1),
                  indices=torch.zeros(1))
    centres = tool.effective_centres(model, [batch])
    assert centres[5].shape == (8, 8, 2) and centres[4].shape == (16, 16, 2)
    np.testing.assert_allclose(centres[5][4, 3], [32 * 3 + 0.5, 32 * 4 + 0.5], atol=2)
    np.testing.assert_allclose(centres[4][8, 7], [16 * 7 + 0.5, 16 * 8 + 0.5], atol=2)
    line = np.zeros((3, 4, 2))
    line[:, :, 0] = 10 * np.arange(4) + 7                       # x of column c: 10 c + 7
    line[:, :, 1] = (10 * np.arange(3) + 7)[:, None]            # y of row r: 10 r + 7
    fitted = tool.fit_map(line, model.cell_maps[5])
    assert (round(fitted.stride, 6), round(fitted.offset, 6), fitted.extent) == (10.0, 7.0, 32.0)


if __name__ == "__main__":  # the README's probe table: probe centroid vs box centre per upsampling
    for name, width in [("resnet10", 0.5), ("resnet18", 0.25), ("resnet50", 1.0)]:
        for upsample in ("aligned", "nearest", "bilinear"):
            net = uniform_(build(name, width, 512, f"model.fpn_upsample={upsample}"))
            cells = [(4, 16), (5, 8)]
            probes = [gradient_centroid(net, 512, lv, c, c)[0] for lv, c in cells]
            boxes = [box_centre(net, 512, lv, c, c)[0] for lv, c in cells]
            print(f"{name:9s} {upsample:9s} P4 probe {probes[0]:6.1f} box {boxes[0]:6.1f} (old {16 * 16.5:.1f})   "
                  f"P5 probe {probes[1]:6.1f} box {boxes[1]:6.1f} (old {32 * 8.5:.1f})")
