"""Models: the CSTN family (FPN levels + CSTN or plain-conv head, joint p(c, l, s)), the CAM baseline and
the paper's comparison methods on CAM (HaS, ACoL, SPG, ADL, CutMix; :mod:`.wsol_methods`).

``build_model(cfg)`` is the one factory; every model returns a :class:`ModelOutput` and names each
parameter's optimizer role through ``model.param_role(name)`` (see :mod:`cstn.params`).
"""

from __future__ import annotations

from torch import nn

from .cam import CAMModel
from .cstn_model import CSTNModel
from .output import ModelOutput, class_log_probs, joint_log_probs
from .wsol_methods import METHODS

__all__ = ["build_model", "is_cam_family", "CAM_FAMILY", "CSTNModel", "CAMModel", "ModelOutput",
           "joint_log_probs", "class_log_probs"]

CAM_FAMILY = ("cam", *METHODS)
"""``model.arch`` values whose models return class activation maps (``ModelOutput.kind == "cam"``)."""


def is_cam_family(arch: str) -> bool:
    """Whether ``model.arch`` is CAM or one of the comparison methods (maps, threshold boxes)."""
    return arch in CAM_FAMILY


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
    elif m.arch in METHODS:
        options = {"has": dict(grid=m.has_grid, hide_prob=m.has_hide_prob),
                   "acol": dict(threshold=m.acol_threshold),
                   "spg": dict(thresholds=list(m.spg_thresholds)),
                   "adl": dict(drop_rate=m.adl_drop_rate, gamma=m.adl_gamma),
                   "cutmix": dict(beta=m.cutmix_beta, prob=m.cutmix_prob)}[m.arch]
        model = METHODS[m.arch](last_stride=m.cam_last_stride, **options, **common)
    elif m.arch == "cstn":
        inputs = {"has": dict(grid=m.has_grid, hide_prob=m.has_hide_prob),
                  "cutmix": dict(beta=m.cutmix_beta, prob=m.cutmix_prob)}.get(m.input_method, {})
        model = CSTNModel(fpn_channels=m.fpn_channels, levels=list(m.levels), kernel_sizes=list(m.kernel_sizes),
                          paddings=list(m.paddings), loc_hidden=m.loc_hidden, head_channels=m.head_channels,
                          head=m.head, head_impl=m.head_impl, fpn_upsample=m.fpn_upsample,
                          extra_relu=m.extra_relu, p5_smooth=m.p5_smooth, shared_classifier=m.shared_classifier,
                          loc_net=m.loc_net, window_span=m.window_span, level_prior=m.level_prior,
                          input_method=m.input_method, input_options=inputs, **common)
    else:
        raise ValueError(f"model.arch={m.arch!r} must be one of {['cstn', *CAM_FAMILY]}")
    model.check_image_size(cfg.data.image_size)
    return model
