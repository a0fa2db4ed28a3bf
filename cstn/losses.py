"""Training loss (paper eq. 2-4): ``L = L_cls + lambda L_theta + alpha L_scale``.

* ``L_cls``: negative log of the marginal ``p(y) = sum_{l,s} p(y, l, s)``, batch mean.
* ``L_theta``: ``||theta_l - identity||^2`` (all 6 entries) summed over every location of every
  level (``loss.theta_reduction = "sum"``, the paper's eq. 2) or averaged over the locations
  (``"mean"``: its size no longer depends on the resolution and k).
* ``L_scale``: for each pair of adjacent levels s1 < s2 (P4, P5), the hinge
  ``max(0, max_l p(s1, l, c*) - max_l p(s2, l, c*))`` on joint probabilities of class c*: zero
  when the coarser level already holds the most probable location. Summed over pairs; zero with a
  single level. ``c*`` is the true class (``loss.scale_class = "label"``) or, as in the authors'
  code, the predicted one (``"predicted"``, argmax p(c), no gradient through the choice).
* Over the batch, ``L_theta`` and ``L_scale`` are averaged like ``L_cls``
  (``loss.reg_batch_reduction = "mean"``) or summed as in the authors' code (``"sum"``): there the
  same lambda and alpha weigh ``B`` times more at batch ``B`` (per rank: the authors trained on
  one GPU, so a config that reproduces them keeps their per-step batch).

Everything is computed in float32 (float64 for a float64 model) with autocast disabled. With
CutMix inputs (``ModelOutput.mix``) ``L_cls`` mixes the two labels by the pasted area, for both
families. For the CAM family the loss is cross-entropy plus the method's own terms
(``ModelOutput.aux_losses``: ACoL's second classifier, SPG's guidance) and nothing else.
"""

from __future__ import annotations

import torch

from cstn.models.output import ModelOutput, class_log_probs, float32_region, joint_log_probs

__all__ = ["compute_loss", "classification_loss", "theta_loss", "scale_loss"]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Batch-mean ``-log p(y)`` from (B, C, L) joint logits or (B, C) class logits."""
    log_pc = class_log_probs(logits)
    return -log_pc.gather(1, labels[:, None]).mean()


def _over_batch(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss.reg_batch_reduction={reduction!r} must be 'mean' or 'sum'")
    return per_image.mean() if reduction == "mean" else per_image.sum()


def theta_loss(theta: torch.Tensor, reduction: str = "sum", batch_reduction: str = "mean") -> torch.Tensor:
    """``L_theta`` from (B, L, 2, 3) thetas: sum (or mean, ``reduction="mean"``) over L of the squared
    distance to the identity, then the batch mean (or sum, ``batch_reduction="sum"``)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"loss.theta_reduction={reduction!r} must be 'sum' or 'mean'")
    with float32_region(theta):
        theta = theta if theta.dtype == torch.float64 else theta.float()
        identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=theta.dtype, device=theta.device)
        per_location = (theta - identity).square().sum(dim=(-2, -1))        # (B, L)
        per_image = per_location.sum(1) if reduction == "sum" else per_location.mean(1)
        return _over_batch(per_image, batch_reduction)


def scale_loss(logits: torch.Tensor, grids, classes: torch.Tensor, batch_reduction: str = "mean") -> torch.Tensor:
    """``L_scale`` (eq. 3).

    Args:
        logits: (B, C, L) joint logits, levels concatenated in ascending order.
        grids: ``((level, H', W'), ...)`` in the same order (``ModelOutput.grids``).
        classes: (B,) int64 class c* of each image (the label, or the prediction).
        batch_reduction: ``mean`` or ``sum`` over the batch.
    """
    joint = joint_log_probs(logits)
    with float32_region(joint):
        row = joint.gather(1, classes[:, None, None].expand(-1, 1, joint.shape[2]))[:, 0]   # (B, L)
        sizes = [h * w for _, h, w in grids]
        if sum(sizes) != row.shape[1]:
            raise ValueError(f"grids {grids} cover {sum(sizes)} locations, logits have {row.shape[1]}")
        best = [part.amax(dim=1).exp() for part in row.split(sizes, dim=1)]   # finer level first
        per_image = row.new_zeros(row.shape[0])
        for best_finer, best_coarser in zip(best, best[1:]):
            per_image = per_image + torch.relu(best_finer - best_coarser)
        return _over_batch(per_image, batch_reduction)


def _mixed_classification(output: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
    cls = classification_loss(output.logits, labels)
    if output.mix is not None:  # CutMix: labels mixed by the pasted area
        perm, lam = output.mix
        cls = lam * cls + (1.0 - lam) * classification_loss(output.logits, labels[perm.to(labels.device)])
    return cls


def compute_loss(output: ModelOutput, labels: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """The training loss of a batch.

    Args:
        output: the model's :class:`ModelOutput`.
        labels: (B,) int64 class indices.
        cfg: a :class:`cstn.config.LossConfig` (``theta_lambda``, ``theta_reduction``, ``scale_alpha``,
            ``reg_batch_reduction``, ``scale_class``).
    Returns:
        ``loss`` (total, scalar with gradient) and the unweighted terms: ``cls``, and ``theta`` and
        ``scale`` for the cstn family (zero for the plain-conv head) or each of
        ``output.aux_losses`` under its own name for the CAM family.
    """
    labels = labels.to(output.logits.device).long().reshape(-1)
    if labels.shape[0] != output.logits.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {output.logits.shape[0]}")
    num_classes = output.logits.shape[1]
    # Range check on CPU only: on a GPU it would force a device sync every step.
    if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (model.num_classes), "
                         f"got {labels.min().item()}..{labels.max().item()}")
    cls = _mixed_classification(output, labels)
    if output.kind == "cam":
        aux = {name: term.float() for name, term in output.aux_losses.items()}
        total = cls + sum(aux.values()) if aux else cls
        return {"loss": total, "cls": cls, **aux}
    if output.kind != "cstn":
        raise ValueError(f"unknown model output kind {output.kind!r}")
    theta = theta_loss(output.theta, cfg.theta_reduction, cfg.reg_batch_reduction)
    if cfg.scale_class not in ("label", "predicted"):
        raise ValueError(f"loss.scale_class={cfg.scale_class!r} must be 'label' or 'predicted'")
    hinge_class = labels if cfg.scale_class == "label" else class_log_probs(output.logits).argmax(dim=1).detach()
    scale = scale_loss(output.logits, output.grids, hinge_class, cfg.reg_batch_reduction)
    total = cls + cfg.theta_lambda * theta + cfg.scale_alpha * scale
    return {"loss": total, "cls": cls, "theta": theta, "scale": scale}
