"""AdamW parameter groups: one rule for what is decayed, one rule for layer-wise lr decay.

Pretraining, every finetuning protocol, multitask tuning and segmentation build their groups
here, so no two stages disagree on which parameters are decayed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

# Last name parts never decayed when `tokens` is on: position tables, cls / mask / task tokens.
TOKEN_SUFFIXES = ("pos_embed", "token", "tokens")


def decays(name: str, p: torch.Tensor, tokens: bool = True) -> bool:
    """Whether weight decay applies to parameter `name`.

    Never on biases or 1-D tensors (norms); with `tokens`, not on position tables and learned
    tokens either, as the official MAE finetuning recipe (pos_embed, cls_token) does. The
    official I-JEPA and MAE pretraining code decays tokens: pretraining passes tokens=False.
    """
    leaf = name.rsplit(".", 1)[-1]
    if p.ndim <= 1 or leaf == "bias":
        return False
    return not (tokens and leaf.endswith(TOKEN_SUFFIXES))


def block_layers(module: nn.Module) -> dict[str, int]:
    """Layer id of each parameter for layer-wise lr decay: 0 before the first transformer block
    (patch and position embeddings, cls token), i + 1 inside block i, depth + 1 after the last
    (final norm), as BEiT and MAE number a ViT.

    Blocks are found by type and parameters by registration order, so any timm-block encoder is
    numbered without knowing its attribute names; a module without blocks is all layer 0.
    """
    block_of = {}
    for i, block in enumerate(m for m in module.modules() if isinstance(m, Block)):
        for p in block.parameters():
            block_of[id(p)] = i + 1
    depth = max(block_of.values(), default=0)
    layers, seen_block = {}, False
    for name, p in module.named_parameters():
        if id(p) in block_of:
            seen_block = True
            layers[name] = block_of[id(p)]
        else:
            layers[name] = depth + 1 if seen_block else 0
    return layers


def param_groups(
    module: nn.Module,
    weight_decay: float,
    lr_scale: float = 1.0,
    layer_decay: float | None = None,
    tokens: bool = True,
    named: Iterable[tuple[str, nn.Parameter]] | None = None,
) -> list[dict]:
    """AdamW groups of a module's trainable parameters (`named` narrows them to a subset).

    Each group: params, lr_scale (the loop multiplies its lr by it), weight_decay and apply_wd
    (whether a weight-decay schedule acts on it). With `layer_decay`, layer l of a depth-L stack
    gets lr_scale * layer_decay ** (L + 1 - l) (see `block_layers`). Groups come in a fixed
    order: by lr scale, decayed before not decayed.
    """
    layers = block_layers(module) if layer_decay is not None else {}
    # The top layer is depth + 1 even when nothing trainable sits after the blocks (an encoder
    # whose final norm was removed): BEiT/MAE number it so whatever follows gets scale 1.
    depth = sum(1 for m in module.modules() if isinstance(m, Block))
    top = depth + 1 if depth else 0
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in named if named is not None else module.named_parameters():
        if not p.requires_grad:  # fixed position tables, frozen networks
            continue
        scale = lr_scale * (layer_decay ** (top - layers[name]) if layer_decay is not None else 1.0)
        on = decays(name, p, tokens)
        group = groups.setdefault(
            (scale, on), {"params": [], "lr_scale": scale, "weight_decay": weight_decay if on else 0.0, "apply_wd": on}
        )
        group["params"].append(p)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


def count_parameters(groups: list[dict]) -> int:
    return sum(p.numel() for g in groups for p in g["params"])


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step on each matrix is rescaled to a trust ratio of its norm.

    The linear-probe optimiser of MAE (taken there from MoCo v3): for a parameter with more than
    one dimension the gradient gets the weight-decay term, then is scaled by
    trust_coefficient * |w| / |g| (by 1 when either norm is 0); biases and other 1-D parameters
    get neither. Then mu = momentum * mu + g and w -= lr * mu. Groups may carry `lr_scale` like
    the AdamW groups above; the training loop sets each group's lr.
    """

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    weight_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = group["trust_coefficient"] * weight_norm / update_norm
                    ratio = torch.where((weight_norm > 0) & (update_norm > 0), ratio, torch.ones_like(ratio))
                    update = update.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                p.add_(buffer, alpha=-group["lr"])
