"""Weight-transfer rules for warm starts (promotion phases and stage chains).

``compatible``: copy every tensor whose name and shape match; report what was skipped and why.
``backbone``:   copy only tensors under the backbone prefix (heads start fresh), shapes must match.
"""

from __future__ import annotations

RULES = ("compatible", "backbone")


def plan_transfer(target_state: dict, source_state: dict, rule: str, backbone_prefix: str = "backbone.") -> dict:
    """Which source tensors go where, without touching any model: {copied, skipped: [(name, why)]}."""
    if rule not in RULES:
        from .errors import UserError

        raise UserError(f"transfer rule {rule!r}: must be one of {', '.join(RULES)}")
    copied, skipped = [], []
    for name, src in source_state.items():
        if rule == "backbone" and not name.startswith(backbone_prefix):
            skipped.append((name, "not backbone"))
        elif name not in target_state:
            skipped.append((name, "no such tensor in target"))
        elif tuple(target_state[name].shape) != tuple(src.shape):
            skipped.append((name, f"shape {tuple(src.shape)} != {tuple(target_state[name].shape)}"))
        else:
            copied.append(name)
    untouched = sorted(set(target_state) - set(copied))
    return {"rule": rule, "copied": sorted(copied), "skipped": skipped, "fresh": untouched}


def apply_transfer(model, source_state: dict, rule: str, backbone_prefix: str = "backbone.") -> dict:
    import torch

    target = model.state_dict()
    plan = plan_transfer(target, source_state, rule, backbone_prefix)
    with torch.no_grad():
        for name in plan["copied"]:
            target[name].copy_(source_state[name].to(target[name].dtype))
    return plan
