"""Models: the CSTN family (FPN levels + CSTN or plain-conv head, joint p(c, l, s)) and the CAM baseline.

``build_model(cfg)`` is the one factory; every model returns a :class:`ModelOutput` and names each
parameter's optimizer role through ``model.param_role(name)`` (see :mod:`cstn.params`).
"""

from __future__ import annotations

from torch import nn

from .cam import CAMModel
from .cstn_model import CSTNModel
from .output import ModelOutput, class_log_probs, joint_log_probs

__all__ = ["build_model", "CSTNModel", "CAMModel", "ModelOutput", "joint_log_probs", "class_log_probs"]


def build_model(cfg) -> nn.Module:
    """The model of ``cfg.model`` (a :class:`cstn.config.Config`), normalising with ``cfg.data.mean/std``.

    Checks that every level's window fits the feature maps at ``cfg.data.image_size`` (ValueError
    naming the keys otherwise). Backbone weights come from ``cfg.model.backbone_weights`` (a local
    file) or are random, with one warning.
    """
    m = cfg.model
    common = dict(backbone=m.backbone, width=m.width, backbone_weights=m.backbone_weights,
                  num_classes=m.num_classes, mean=list(cfg.data.mean), std=list(cfg.data.std))
    if m.arch == "cam":
        model = CAMModel(last_stride=m.cam_last_stride, **common)
    elif m.arch == "cstn":
        model = CSTNModel(fpn_channels=m.fpn_channels, levels=list(m.levels), kernel_sizes=list(m.kernel_sizes),
                          paddings=list(m.paddings), loc_hidden=m.loc_hidden, head_channels=m.head_channels,
                          head=m.head, head_impl=m.head_impl, **common)
    else:
        raise ValueError(f"model.arch={m.arch!r} must be 'cstn' or 'cam'")
    model.check_image_size(cfg.data.image_size)
    return model
