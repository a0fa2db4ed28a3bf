"""Training loss (paper eq. 2-4): ``L = L_cls + lambda L_theta + alpha L_scale``.

* ``L_cls``: negative log of the marginal ``p(y) = sum_{l,s} p(y, l, s)``, batch mean.
* ``L_theta``: ``||theta_l - identity||^2`` (all 6 entries) summed over every location of every
  level (``loss.theta_reduction = "sum"``, the paper's eq. 2) or averaged over the locations
  (``"mean"``: its size no longer depends on the resolution and k); then the batch mean.
* ``L_scale``: for each pair of adjacent levels s1 < s2 (P4, P5), the hinge
  ``max(0, max_l p(s1, l, y) - max_l p(s2, l, y))`` on joint probabilities of the true class y:
  zero when the coarser level already holds the most probable location. Summed over pairs,
  batch mean; zero with a single level.

Everything is computed in float32 (float64 for a float64 model) with autocast disabled. For the
CAM family the loss is cross-entropy (label-mixed for CutMix) plus the method's own terms
(``ModelOutput.aux_losses``: ACoL's second classifier, SPG's guidance), and the two
regularisers are zero.
"""

from __future__ import annotations

import torch

from cstn.models.output import ModelOutput, class_log_probs, float32_region, joint_log_probs

__all__ = ["compute_loss", "classification_loss", "theta_loss", "scale_loss"]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Batch-mean ``-log p(y)`` from (B, C, L) joint logits or (B, C) class logits."""
    log_pc = class_log_probs(logits)
    return -log_pc.gather(1, labels[:, None]).mean()


def theta_loss(theta: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """``L_theta`` from (B, L, 2, 3) thetas: sum (or mean, ``reduction="mean"``) over L of the squared
    distance to the identity, then the batch mean."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"loss.theta_reduction={reduction!r} must be 'sum' or 'mean'")
    with float32_region(theta):
        theta = theta if theta.dtype == torch.float64 else theta.float()
        identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=theta.dtype, device=theta.device)
        per_location = (theta - identity).square().sum(dim=(-2, -1))        # (B, L)
        per_image = per_location.sum(1) if reduction == "sum" else per_location.mean(1)
        return per_image.mean()


def scale_loss(logits: torch.Tensor, grids, labels: torch.Tensor) -> torch.Tensor:
    """``L_scale`` (eq. 3).

    Args:
        logits: (B, C, L) joint logits, levels concatenated in ascending order.
        grids: ``((level, H', W'), ...)`` in the same order (``ModelOutput.grids``).
        labels: (B,) int64.
    """
    joint = joint_log_probs(logits)
    with float32_region(joint):
        row = joint.gather(1, labels[:, None, None].expand(-1, 1, joint.shape[2]))[:, 0]   # (B, L)
        sizes = [h * w for _, h, w in grids]
        if sum(sizes) != row.shape[1]:
            raise ValueError(f"grids {grids} cover {sum(sizes)} locations, logits have {row.shape[1]}")
        best = [part.amax(dim=1).exp() for part in row.split(sizes, dim=1)]   # finer level first
        total = row.new_zeros(())
        for best_finer, best_coarser in zip(best, best[1:]):
            total = total + torch.relu(best_finer - best_coarser).mean()
        return total


def compute_loss(output: ModelOutput, labels: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """The training loss of a batch.

    Args:
        output: the model's :class:`ModelOutput`.
        labels: (B,) int64 class indices.
        cfg: a :class:`cstn.config.LossConfig` (``theta_lambda``, ``theta_reduction``, ``scale_alpha``).
    Returns:
        ``loss`` (total, scalar with gradient) and the unweighted terms ``cls``, ``theta``,
        ``scale`` (scalars; ``theta``/``scale`` are zero for the CAM family and for the plain-conv
        head), plus each of ``output.aux_losses`` under its own name.
    """
    labels = labels.to(output.logits.device).long().reshape(-1)
    if labels.shape[0] != output.logits.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {output.logits.shape[0]}")
    num_classes = output.logits.shape[1]
    # Range check on CPU only: on a GPU it would force a device sync every step.
    if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (model.num_classes), "
                         f"got {labels.min().item()}..{labels.max().item()}")
    cls = classification_loss(output.logits, labels)
    if output.kind == "cam":
        if output.mix is not None:  # CutMix: labels mixed by the pasted area
            perm, lam = output.mix
            cls = lam * cls + (1.0 - lam) * classification_loss(output.logits, labels[perm.to(labels.device)])
        zero = cls.new_zeros(())
        aux = {name: term.float() for name, term in output.aux_losses.items()}
        total = cls + sum(aux.values()) if aux else cls
        return {"loss": total, "cls": cls, "theta": zero, "scale": zero, **aux}
    if output.kind != "cstn":
        raise ValueError(f"unknown model output kind {output.kind!r}")
    theta = theta_loss(output.theta, cfg.theta_reduction)
    scale = scale_loss(output.logits, output.grids, labels)
    total = cls + cfg.theta_lambda * theta + cfg.scale_alpha * scale
    return {"loss": total, "cls": cls, "theta": theta, "scale": scale}
