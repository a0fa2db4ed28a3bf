"""Optimizer parameter groups: backbone, new layers and the theta-predicting layers apart.

DESIGN §7: at the full learning rate the localisation nets blew the boxes up to the whole image
within 20 steps; they get ``optim.theta_lr_mult`` (0.05 by default). The pretrained backbone gets
``optim.backbone_lr_mult``. Biases and normalisation weights (every parameter with fewer than two
dimensions) get no weight decay unless ``optim.decay_norm_bias``; parameters named by a prefix in
``optim.no_decay`` get none either. Parameters named by a prefix in ``optim.frozen`` are not
trained at all (:func:`freeze`), as the authors' code leaves its stem, ``layer1``, FPN convs and
class conv out of its optimizer.
"""

from __future__ import annotations

from torch import nn

__all__ = ["param_groups", "freeze", "ROLES"]

ROLES = ("backbone", "new", "theta")


def _matches(name: str, prefixes) -> bool:
    return any(name.startswith(prefix) for prefix in prefixes)


def freeze(model: nn.Module, prefixes) -> int:
    """Turn off ``requires_grad`` for every parameter whose name starts with one of ``prefixes``
    (names of the bare model; a wrapper's ``module.`` is ignored). Returns how many were frozen;
    a prefix that matches no parameter is a ValueError naming it (``optim.frozen``)."""
    inner = getattr(model, "module", model)
    names = [name for name, _ in inner.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            raise ValueError(f"optim.frozen: {prefix!r} matches no parameter of the model "
                             f"(parameters start with {sorted({n.split('.')[0] + '.' for n in names})})")
    count = 0
    for name, param in inner.named_parameters():
        if _matches(name, prefixes):
            param.requires_grad_(False)
            count += 1
    return count


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """Groups for a ``torch.optim`` optimizer (or DeepSpeed's ``model_parameters``).

    Args:
        model: a model from :func:`cstn.models.build_model` (it names each parameter's role through
            ``param_role(name)``; a DDP/DeepSpeed wrapper's ``module.`` prefix is accepted).
        cfg: a :class:`cstn.config.OptimConfig` (``lr``, ``backbone_lr_mult``, ``theta_lr_mult``,
            ``weight_decay``, ``frozen``, ``no_decay``, ``decay_norm_bias``).
    Returns:
        Non-empty groups, in this order: ``backbone``, ``backbone/no_decay``, ``new``,
        ``new/no_decay``, ``theta``, ``theta/no_decay``. Each dict has ``name``, ``params``,
        ``lr`` (= ``cfg.lr * lr_mult``), ``lr_mult`` and ``weight_decay``. Frozen parameters
        (``requires_grad=False`` or named in ``cfg.frozen``) are left out.
    """
    inner = getattr(model, "module", model)
    role_of = getattr(inner, "param_role", None)
    if role_of is None:
        raise TypeError(f"{type(inner).__name__} has no param_role(name); build it with cstn.models.build_model")
    mults = {"backbone": cfg.backbone_lr_mult, "new": 1.0, "theta": cfg.theta_lr_mult}
    frozen, no_decay = list(getattr(cfg, "frozen", [])), list(getattr(cfg, "no_decay", []))
    decay_norm_bias = bool(getattr(cfg, "decay_norm_bias", False))
    buckets: dict[tuple[str, bool], list] = {(role, decay): [] for role in ROLES for decay in (True, False)}
    for name, param in inner.named_parameters():
        if not param.requires_grad or _matches(name, frozen):
            continue
        role = role_of(name)
        if role not in mults:
            raise ValueError(f"parameter {name}: unknown role {role!r}")
        decay = (param.ndim >= 2 or decay_norm_bias) and not _matches(name, no_decay)
        buckets[(role, decay)].append(param)
    groups = []
    for role in ROLES:
        for decay in (True, False):
            params = buckets[(role, decay)]
            if params:
                groups.append({
                    "name": role if decay else f"{role}/no_decay",
                    "params": params,
                    "lr": cfg.lr * mults[role],
                    "lr_mult": mults[role],
                    "weight_decay": cfg.weight_decay if decay else 0.0,
                })
    return groups
