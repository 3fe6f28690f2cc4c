"""The officially released I-JEPA and MAE checkpoint layouts: read them into a method, write ours in them.

- I-JEPA (`IN1K-vit.h.14-300e.pth.tar`, ...): {'encoder', 'predictor', 'target_encoder': state
  dicts with every key prefixed 'module.', plus 'opt', 'scaler', 'epoch', 'loss', 'batch_size',
  'world_size', 'lr'}. Encoder: pos_embed [1, N, D], patch_embed.proj, blocks.{i}, norm.
- MAE (`mae_pretrain_vit_base.pth`, ...): {'model': state dict}, no prefix; encoder keys
  cls_token, pos_embed [1, 1 + N, D] (cls slot first), patch_embed, blocks, norm; the `_full` and
  `mae_visualize_` files add mask_token and decoder_{embed,pos_embed,blocks,norm,pred}.

Reading is weights-only (benchmark.core.checkpoint.load) and strict: the architecture is read off the
tensors and compared with the config first, then every tensor must match a parameter by name
and shape (benchmark.core.checkpoint.load_weights names the ones that do not). Position tables are
resampled bicubically on the patch grid when the file was trained at another resolution, as
MAE's and timm's loaders do.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from benchmark.core.checkpoint import load_weights
from benchmark.core.errors import CheckpointError
from methods import build_method, method_from_state
from methods.base import Method

JEPA_PARTS = ("encoder", "predictor", "target_encoder")
JEPA_METHODS = ("ijepa", "iwm")
MAE_DECODER_PREFIXES = ("mask_token", "decoder_")
PREFIX = "module."


def layout_of(state) -> str:
    """'bench' (written by bench run), 'ijepa' or 'mae' (official releases); CheckpointError otherwise."""
    if isinstance(state, dict):
        if isinstance(state.get("method"), dict) and "weights" in state["method"]:
            return "bench"
        if any(isinstance(state.get(part), dict) for part in JEPA_PARTS):
            return "ijepa"
        if isinstance(state.get("model"), dict):
            return "mae"
    keys = ", ".join(map(str, list(state)[:6])) if isinstance(state, dict) else type(state).__name__
    raise CheckpointError(f"unknown checkpoint layout (top level: {keys}): expected one written by bench run, "
                          "an official I-JEPA file (encoder/predictor/target_encoder) or an MAE file ({'model': ...})")


def strip_prefix(weights: dict, prefix: str = PREFIX) -> dict:
    """Drop the DistributedDataParallel prefix when every key carries it."""
    if weights and all(k.startswith(prefix) for k in weights):
        return {k[len(prefix):]: v for k, v in weights.items()}
    return dict(weights)


def _shape(weights: dict, key: str, what: str) -> tuple[int, ...]:
    if key not in weights or not isinstance(weights[key], torch.Tensor):
        raise CheckpointError(f"{what} has no tensor {key!r}: cannot read its architecture")
    return tuple(weights[key].shape)


def _count(weights: dict, prefix: str) -> int:
    """Number of distinct blocks `prefix{i}.`; a gap in the numbering then fails in load_weights."""
    return len({k[len(prefix):].split(".")[0] for k in weights if k.startswith(prefix)})


def vit_architecture(weights: dict, prefix_tokens: int, what: str) -> dict:
    """patch_size, embed_dim, depth and mlp_ratio of a ViT encoder, from its tensors.

    Heads are not recoverable from the weights (qkv is [3D, D] for any head count).
    """
    dim, _, p, p2 = _shape(weights, "patch_embed.proj.weight", what)
    if p != p2:
        raise CheckpointError(f"{what}: non-square patches {p}x{p2} are not supported")
    tokens = _shape(weights, "pos_embed", what)[1] - prefix_tokens
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{what}: pos_embed holds {tokens} patch positions, not a square grid")
    hidden = _shape(weights, "blocks.0.mlp.fc1.weight", what)[0]
    return {"patch_size": p, "embed_dim": dim, "depth": _count(weights, "blocks."),
            "mlp_ratio": hidden / dim}


def resample_pos_embed(pos: torch.Tensor, grid: int, prefix_tokens: int) -> torch.Tensor:
    """[1, prefix + g*g, D] -> [1, prefix + grid*grid, D]: bicubic on the patch grid, prefix rows kept."""
    head, table = pos[:, :prefix_tokens], pos[:, prefix_tokens:]
    old = math.isqrt(table.size(1))
    if old == grid:
        return pos
    img = table.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    table = img.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
    return torch.cat([head, table], dim=1)


def _check(path: Path, layout: str, cfg: DictConfig, found: dict[str, object]) -> None:
    """found: dotted config key -> value read from the file; lists every disagreement at once."""
    differ = [f"{key.rpartition('.')[2]}={value} (config {key}={OmegaConf.select(cfg, key)})"
              for key, value in found.items() if value != OmegaConf.select(cfg, key)]
    if differ:
        raise CheckpointError(f"{path} ({layout} layout) does not match model={cfg.choices.model} "
                              f"method={cfg.choices.method}: {', '.join(differ)}")


def _encoder_checks(arch: dict) -> dict[str, object]:
    return {f"model.{k}": arch[k] for k in ("patch_size", "embed_dim", "depth", "mlp_ratio")}


def _build(cfg: DictConfig) -> Method:
    config = OmegaConf.to_container(cfg, resolve=True)
    return build_method(cfg.method.name, config["model"], config["method"], cfg.data.image_size)


def _load_ijepa(state: dict, path: Path, cfg: DictConfig) -> Method:
    if cfg.method.name not in JEPA_METHODS:
        raise CheckpointError(f"{path} is an I-JEPA checkpoint (encoder/predictor/target_encoder): "
                              f"use method=ijepa (or iwm), not method={cfg.method.name}")
    missing = [part for part in JEPA_PARTS if not isinstance(state.get(part), dict)]
    if missing:
        raise CheckpointError(f"{path} (ijepa layout) lacks {', '.join(missing)}: "
                              f"an I-JEPA file holds {', '.join(JEPA_PARTS)}")
    parts = {part: strip_prefix(state[part]) for part in JEPA_PARTS}
    arch = vit_architecture(parts["target_encoder"], 0, f"{path} 'target_encoder'")
    pred_width = _shape(parts["predictor"], "predictor_embed.weight", f"{path} 'predictor'")[0]
    _check(path, "ijepa", cfg, {**_encoder_checks(arch), "method.predictor.width": pred_width,
                                "method.predictor.depth": _count(parts["predictor"], "predictor_blocks.")})
    method = _build(cfg)
    grid = method.encoder.grid
    for part, pos_key in (("encoder", "pos_embed"), ("target_encoder", "pos_embed"),
                          ("predictor", "predictor_pos_embed")):
        if isinstance(parts[part].get(pos_key), torch.Tensor):
            parts[part][pos_key] = resample_pos_embed(parts[part][pos_key], grid, 0)
        load_weights(getattr(method, part), parts[part], f"{path} '{part}'")
    return method


def _load_mae(state: dict, path: Path, cfg: DictConfig) -> Method:
    if cfg.method.name != "mae":
        raise CheckpointError(f"{path} is an MAE checkpoint ({{'model': ...}}): use method=mae, "
                              f"not method={cfg.method.name}")
    weights = strip_prefix(state["model"])
    decoder = {k: v for k, v in weights.items() if k.startswith(MAE_DECODER_PREFIXES)}
    encoder = {k: v for k, v in weights.items() if k not in decoder}
    arch = vit_architecture(encoder, 1, f"{path} 'model'")
    found = _encoder_checks(arch)
    if decoder:
        found["method.predictor.width"] = _shape(decoder, "decoder_embed.weight", f"{path} 'model'")[0]
        found["method.predictor.depth"] = _count(decoder, "decoder_blocks.")
    _check(path, "mae", cfg, found)
    method = _build(cfg)
    grid = method.encoder.grid
    if isinstance(encoder.get("pos_embed"), torch.Tensor):
        encoder["pos_embed"] = resample_pos_embed(encoder["pos_embed"], grid, 1)
    load_weights(method.encoder, encoder, f"{path} encoder")
    if decoder:
        if isinstance(decoder.get("decoder_pos_embed"), torch.Tensor):
            decoder["decoder_pos_embed"] = resample_pos_embed(decoder["decoder_pos_embed"], grid, 1)
        load_weights(method.predictor, decoder, f"{path} decoder")
    else:
        # An encoder-only release: no decoder rather than a random one passed off as pretrained.
        method.predictor = None
    return method


def method_from_official(state: dict, path: Path, cfg: DictConfig) -> Method:
    """A method holding the weights of an official I-JEPA or MAE file, checked against cfg."""
    layout = layout_of(state)
    if layout == "ijepa":
        return _load_ijepa(state, path, cfg)
    if layout == "mae":
        return _load_mae(state, path, cfg)
    raise CheckpointError(f"{path} is a bench checkpoint, not an official release")


def _epochs_done(checkpoint: dict) -> int:
    """Completed epochs of one of our checkpoints (I-JEPA's 'epoch' field)."""
    pre = checkpoint["config"]["pretrain"]
    # total_steps spans epochs * ipe_scale epochs; the small slack absorbs float rounding.
    return int(checkpoint["step"] * pre["epochs"] * pre["ipe_scale"] / checkpoint["total_steps"] + 1e-6)


def to_official(checkpoint: dict, encoder_only: bool = False) -> tuple[str, dict]:
    """(layout, payload) of one of our checkpoints in the released layout of its method.

    I-JEPA and IWM -> the I-JEPA .pth.tar layout (IWM's predictor keeps its conditioning
    weights, which the official predictor does not have; its encoders are plain I-JEPA ones).
    'opt' and 'scaler' are None: our optimiser state does not map onto the official one.
    MAE -> {'model': encoder + decoder} (the `_full` layout) or the encoder alone.
    """
    if layout_of(checkpoint) != "bench":
        raise CheckpointError("not a checkpoint written by bench run")
    method = method_from_state(checkpoint["method"])
    if method.name in JEPA_METHODS:
        if encoder_only:
            raise CheckpointError("--encoder-only applies to MAE; the I-JEPA layout always holds all three networks")
        pre = checkpoint["config"]["pretrain"]
        payload = {part: {PREFIX + k: v.clone() for k, v in getattr(method, part).state_dict().items()}
                   for part in JEPA_PARTS}
        payload.update(opt=None, scaler=None, epoch=_epochs_done(checkpoint), loss=None,
                       batch_size=pre["batch_size"], world_size=1, lr=pre["lr"])
        return "ijepa", payload
    if method.name == "mae":
        weights = {k: v.clone() for k, v in method.encoder.state_dict().items()}
        if not encoder_only:
            weights.update({k: v.clone() for k, v in method.predictor.state_dict().items()})
        return "mae", {"model": weights}
    raise CheckpointError(f"method {method.name} has no official layout")
