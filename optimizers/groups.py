"""Parameter groups from config: weight decay by kind of parameter, lr multipliers by name."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from torchprime.errors import ConfigError
from torchprime.sharding import pattern_regex
from torchprime.stacking import parameter_aliases


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases and embeddings are not decayed (vectors and lookup tables)."""
    return param.dim() < 2 or "embed" in name


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_multipliers: dict[str, float],
    key: str = "trainer.optimizer.lr_multipliers",
) -> list[dict[str, Any]]:
    """Groups of trainable parameters, each with its `weight_decay` and `lr_multiplier`.

    `lr_multipliers` maps name patterns (as in model.sharding: `*` is one name component) to a
    factor on the scheduled lr. A pattern that matches no parameter, or two patterns giving one
    parameter different factors, stop the run with the names. Weights stored stacked
    (model.remat.stack_weights) answer to their per-layer names, and a pattern must match all
    of a stack's layers or none.
    """
    # Tied parameters answer to every name (lm_head.weight and the embedding, say); stacked
    # ones to each layer's name (torchprime.stacking).
    aliases = parameter_aliases(model)
    names_of: dict[int, list[str]] = {}
    stacked: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).extend(aliases[name])
        if len(aliases[name]) > 1:
            stacked.add(id(p))
    all_names = [n for names in names_of.values() for n in names]
    factor_of: dict[int, tuple[str, float]] = {}
    for pattern, factor in lr_multipliers.items():
        regex = pattern_regex(pattern)
        matched = [pid for pid, names in names_of.items() if any(regex.match(n) for n in names)]
        if not matched:
            close = difflib.get_close_matches(pattern, all_names, n=3, cutoff=0.4)
            raise ConfigError(
                f"{key}[{pattern!r}] matches no parameter. Closest names: "
                f"{', '.join(close) if close else '(none alike)'}."
            )
        if not factor > 0:
            raise ConfigError(f"{key}[{pattern!r}]={factor}: a multiplier must be positive.")
        for pid in matched:
            hit = [regex.match(n) is not None for n in names_of[pid]]
            if pid in stacked and not all(hit):
                raise ConfigError(
                    f"{key}[{pattern!r}] matches {sum(hit)} of the {len(hit)} layers whose "
                    f"weights are stored stacked ({names_of[pid][0]}, ...) with "
                    "model.remat.stack_weights=true: they share one tensor, so one factor."
                )
            if pid in factor_of and factor_of[pid][1] != factor:
                raise ConfigError(
                    f"{key}: {names_of[pid][0]} matches both {factor_of[pid][0]!r} and "
                    f"{pattern!r}, with different factors."
                )
            factor_of[pid] = (pattern, float(factor))

    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A stacked weight decays as each of its layers' weights would (its slice's dims).
        layer_p = p[0] if id(p) in stacked else p
        decay = 0.0 if no_decay(aliases[name][0], layer_p) else weight_decay
        mult = factor_of.get(id(p), ("", 1.0))[1]
        group = groups.setdefault(
            (decay, mult), {"params": [], "weight_decay": decay, "lr_multiplier": mult}
        )
        group["params"].append(p)
    return list(groups.values())
