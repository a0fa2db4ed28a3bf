"""One module from images to boxes: what a deployed model (the MLflow model of a run) computes.

:class:`BoxPredictor` wraps a trained model of either family and decodes its output exactly as
the evaluator does (``cfg.eval``: MAP box, box voting or a thresholded map for CSTN; the
thresholded class map for the CAM family), returning a plain tensor, so that tools which
trace, export or serve ``nn.Module`` outputs (``mlflow.pytorch``, ``torch.export``) need no
knowledge of :class:`~cstn.models.output.ModelOutput`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BoxPredictor"]


class BoxPredictor(nn.Module):
    """``forward(images (B, 3, S, S) uint8) -> (B, 6) float32``: per image the Top-1 box ``x0, y0, x1, y1``
    in INPUT pixels (the ``S x S`` grid; ``pipeline.schema.boxes_to_original`` maps them back), the
    predicted class and its probability ``p(c)``.

    Args:
        model: a model from :func:`cstn.models.build_model`, trained.
        cfg: its :class:`cstn.config.Config` (``eval`` decides the decoding, ``model.arch`` the family).
    """

    def __init__(self, model: nn.Module, cfg):
        super().__init__()
        self.model = model
        self.cfg = cfg

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from cstn.evaluation import score_cam, score_cstn
        from cstn.models import is_cam_family

        self.model.eval()
        output = self.model(images)
        classes = output.class_log_probs().argmax(dim=1)
        if is_cam_family(self.cfg.model.arch):
            scored = score_cam(self.model, output, classes, self.cfg)
        else:
            scored = score_cstn(output, classes, self.cfg)
        top = torch.stack([scored.topk_classes[:, 0].float(), scored.topk_scores[:, 0].float()], dim=1)
        return torch.cat([scored.top1.float().cpu(), top.cpu()], dim=1)
