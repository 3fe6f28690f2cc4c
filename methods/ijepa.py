"""I-JEPA: predict the EMA encoder's latents of masked target blocks from a context block.

Also the official I-JEPA release layout (`IN1K-vit.h.14-300e.pth.tar`, ...), read and written
here: {'encoder', 'predictor', 'target_encoder': state dicts with every key prefixed 'module.',
'opt', 'scaler', 'epoch', 'loss', 'batch_size', 'world_size', 'lr'}.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from benchmark.core.checkpoint import load_weights, strip_prefix
from benchmark.core.errors import CheckpointError
from benchmark.core.layers import gather_tokens
from benchmark.core.schedules import linear
from benchmark.core.transforms import INTERPOLATIONS, crop_transform
from methods.base import Capabilities, Method, check_predictor
from methods.losses import LATENT_LOSSES, ema_update, latent_regression
from methods.masks import MaskConfig, MultiBlockMasker
from methods.vit import (
    Predictor,
    VisionTransformer,
    count_blocks,
    encoder_levels,
    resample_pos_embed,
    tensor_shape,
    vit_architecture,
)

JEPA_PARTS = ("encoder", "predictor", "target_encoder")
DDP_PREFIX = "module."


def build_encoder(model_cfg: dict, image_size: int) -> VisionTransformer:
    return VisionTransformer(
        img_size=image_size,
        patch_size=model_cfg["patch_size"],
        embed_dim=model_cfg["embed_dim"],
        depth=model_cfg["depth"],
        num_heads=model_cfg["num_heads"],
        mlp_ratio=model_cfg.get("mlp_ratio", 4.0),
        drop_path=model_cfg.get("drop_path", 0.0),
    )


def build_predictor(encoder: VisionTransformer, model_cfg: dict, predictor_cfg: dict) -> Predictor:
    # Predictor heads default to the encoder's, as in the official code.
    return Predictor(
        num_patches=encoder.num_patches,
        grid=encoder.grid,
        embed_dim=encoder.embed_dim,
        predictor_dim=predictor_cfg["width"],
        depth=predictor_cfg["depth"],
        num_heads=predictor_cfg.get("num_heads") or encoder.num_heads,
        mlp_ratio=model_cfg.get("mlp_ratio", 4.0),
        conditioning=predictor_cfg.get("conditioning", "none"),
        action_dim=predictor_cfg.get("action_dim", 0),
    )


class IJEPA(Method):
    """I-JEPA (arXiv 2301.08243): multi-block masking, EMA target, latent regression."""

    name = "ijepa"
    official_layout = "ijepa"
    official_step = "ijepa"
    official_pipeline = "ijepa"
    official_about = "an I-JEPA checkpoint (encoder/predictor/target_encoder)"

    @classmethod
    def check_config(cls, method_cfg: dict, model_cfg: dict, image_size: int) -> None:
        grid = image_size // model_cfg["patch_size"]
        try:  # the masker owns these rules
            MultiBlockMasker(
                grid, MaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in method_cfg["mask"].items()})
            )
        except (ValueError, TypeError) as exc:
            where = f" (data.image_size={image_size}, model.patch_size={model_cfg['patch_size']})"
            raise ValueError(f"{exc}{where if 'grid' in str(exc) else ''}") from None
        check_predictor(method_cfg, model_cfg)
        if method_cfg.get("interpolation", "bicubic") not in INTERPOLATIONS:
            raise ValueError(
                f"method.interpolation must be {' or '.join(INTERPOLATIONS)}, got {method_cfg['interpolation']!r}"
            )
        if method_cfg["loss"] not in LATENT_LOSSES:
            raise ValueError(f"method.loss must be {', '.join(LATENT_LOSSES)}, got {method_cfg['loss']!r}")
        ema = method_cfg["ema"]
        if not (len(ema) == 2 and 0.0 <= ema[0] <= ema[1] <= 1.0):
            raise ValueError(f"method.ema must be [start, end] with 0 <= start <= end <= 1, got {list(ema)}")

    def __init__(self, model_cfg: dict, method_cfg: dict, image_size: int):
        super().__init__(model_cfg, method_cfg, image_size)
        self.check_config(method_cfg, model_cfg, image_size)
        self.encoder = build_encoder(model_cfg, image_size)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.predictor = self.new_predictor()
        self.masker = MultiBlockMasker(
            self.encoder.grid,
            MaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in method_cfg["mask"].items()}),
        )
        self._ema_pairs: tuple[list, list] | None = None

    @property
    def capabilities(self) -> Capabilities:
        conditioned = self.predictor is not None and self.predictor.conditioning != "none"
        return Capabilities(
            predictor=self.predictor is not None, target_encoder=True, conditioned=conditioned, masks=True
        )

    def dense_features(self, images, key, blocks):
        return encoder_levels(self.eval_encoder(key), images, blocks)

    def train_transform(self):
        c = self.method_cfg
        return crop_transform(
            self.image_size, c["crop_scale"], flip=c.get("flip", False), interpolation=c.get("interpolation", "bicubic")
        )

    def collate(self, items: list) -> dict:
        views, labels, seeds = zip(*items)
        ctx_idx, tgt_idx = self.sample_masks(len(items), torch.Generator().manual_seed(seeds[0]))
        return {"images": torch.stack(views), "labels": torch.tensor(labels), "ctx_idx": ctx_idx, "tgt_idx": tgt_idx}

    def sample_masks(self, batch_size: int, gen: torch.Generator):
        return self.masker.sample(batch_size, gen)

    def targets(self, images: torch.Tensor, tgt_idx: list[torch.Tensor]) -> torch.Tensor:
        """Layer-normed EMA-encoder latents at every target block, stacked block-major."""
        with torch.no_grad():
            h = self.target_latents(images)
            return torch.cat([gather_tokens(h, idx) for idx in tgt_idx])

    def predict_blocks(
        self,
        context: torch.Tensor,
        ctx_idx: torch.Tensor,
        tgt_idx: list[torch.Tensor],
        action: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One predictor pass for all target blocks: the context is repeated once per block."""
        n = len(tgt_idx)
        return self.predict(
            context.repeat(n, 1, 1),
            ctx_idx.repeat(n, 1),
            torch.cat(tgt_idx),
            None if action is None else action.repeat(n, 1),
        )

    def new_predictor(self) -> Predictor:
        return build_predictor(self.encoder, self.model_cfg, self.method_cfg["predictor"])

    def predict(self, context, ctx_idx, tgt_idx, action=None, extra=None):
        # An unconditioned predictor (plain I-JEPA) ignores the action; IWM's uses it.
        return self.predictor(context, ctx_idx, tgt_idx, action, extra)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        target = self.targets(batch["images"], batch["tgt_idx"])
        context = self.encode_context(batch["images"], batch["ctx_idx"])
        pred = self.predict_blocks(context, batch["ctx_idx"], batch["tgt_idx"])
        return {"loss": self._loss(pred, target)}

    def _loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return latent_regression(pred, target, self.method_cfg["loss"])

    def ema_momentum(self, progress: float) -> float:
        start, end = self.method_cfg["ema"]
        return linear(progress, 1.0, start, end)

    def after_step(self, progress: float) -> None:
        if self._ema_pairs is None:
            self._ema_pairs = (list(self.target_encoder.parameters()), list(self.encoder.parameters()))
        ema_update(*self._ema_pairs, self.ema_momentum(progress))

    # --- the official release layout -------------------------------------------------------------
    @classmethod
    def official_matches(cls, state: dict) -> bool:
        return any(isinstance(state.get(part), dict) for part in JEPA_PARTS)

    @classmethod
    def _official_parts(cls, state: dict, path: Path) -> dict[str, dict]:
        missing = [part for part in JEPA_PARTS if not isinstance(state.get(part), dict)]
        if missing:
            raise CheckpointError(
                f"{path} (ijepa layout) lacks {', '.join(missing)}: an I-JEPA file holds {', '.join(JEPA_PARTS)}"
            )
        return {part: strip_prefix(state[part], DDP_PREFIX) for part in JEPA_PARTS}

    @classmethod
    def official_architecture(cls, state: dict, path: Path) -> dict[str, object]:
        parts = cls._official_parts(state, path)
        found = vit_architecture(parts["target_encoder"], 0, f"{path} 'target_encoder'")
        found["method.predictor.width"] = tensor_shape(
            parts["predictor"], "predictor_embed.weight", f"{path} 'predictor'"
        )[0]
        found["method.predictor.depth"] = count_blocks(parts["predictor"], "predictor_blocks.")
        return found

    def load_official(self, state: dict, path: Path) -> None:
        parts = self._official_parts(state, path)
        for part, pos_key in (
            ("encoder", "pos_embed"),
            ("target_encoder", "pos_embed"),
            ("predictor", "predictor_pos_embed"),
        ):
            if isinstance(parts[part].get(pos_key), torch.Tensor):
                parts[part][pos_key] = resample_pos_embed(parts[part][pos_key], self.grid, self.grid)
            load_weights(getattr(self, part), parts[part], f"{path} '{part}'")

    def to_official(self, checkpoint: dict, encoder_only: bool = False) -> dict:
        """The I-JEPA layout, with an optimiser state the official training loop resumes from.

        `opt` holds AdamW's moments in the official four groups (encoder decayed, predictor
        decayed, encoder not decayed, predictor not decayed), `scaler` a fresh GradScaler state
        when the run used bf16 (the official loop then has one), `epoch` the completed epochs and
        `loss` the last epoch's mean loss. An IWM predictor keeps its conditioning weights, which
        the official predictor does not have.
        """
        if encoder_only:
            raise CheckpointError("--encoder-only applies to MAE; the I-JEPA layout always holds all three networks")
        pre = checkpoint["config"]["pretrain"]
        payload = {
            part: {DDP_PREFIX + k: v.clone() for k, v in getattr(self, part).state_dict().items()}
            for part in JEPA_PARTS
        }
        recent = checkpoint.get("recent_losses") or []
        payload.update(
            opt=self._official_optimizer(checkpoint["optimizer"]),
            scaler=GRAD_SCALER_STATE.copy() if pre["bf16"] else None,
            epoch=completed_epochs(checkpoint),
            loss=float(sum(recent) / len(recent)) if recent else float("nan"),
            batch_size=pre["batch_size"],
            world_size=1,
            lr=pre["lr"],
        )
        return payload

    def _official_optimizer(self, ours: dict) -> dict:
        """Our AdamW state (groups of `param_groups()`) re-indexed into the official four groups."""
        name_of = {id(p): n for n, p in self.named_parameters()}
        ours_by_name = {}
        index = 0
        for group in self.param_groups():
            for p in group["params"]:
                if index in ours["state"]:
                    ours_by_name[name_of[id(p)]] = ours["state"][index]
                index += 1
        options = {k: v for k, v in ours["param_groups"][0].items() if k not in ("params", "apply_wd", "lr_scale")}
        options.update(fused=None, foreach=None)  # the official optimiser's defaults
        groups, state, index = [], {}, 0
        for decayed in (True, False):
            for part in ("encoder", "predictor"):
                ids = []
                # The official rule: every named parameter, frozen position tables included.
                for n, p in getattr(self, part).named_parameters():
                    if ("bias" not in n and p.ndim != 1) != decayed:
                        continue
                    if f"{part}.{n}" in ours_by_name:
                        state[index] = ours_by_name[f"{part}.{n}"]
                    ids.append(index)
                    index += 1
                group = dict(options, params=ids)
                if not decayed:
                    group.update(WD_exclude=True, weight_decay=0.0)
                groups.append(group)
        return {"state": state, "param_groups": groups}


# torch.cuda.amp.GradScaler's initial state, which the official bf16 loop loads.
GRAD_SCALER_STATE = {
    "scale": 65536.0,
    "growth_factor": 2.0,
    "backoff_factor": 0.5,
    "growth_interval": 2000,
    "_growth_tracker": 0,
}


def completed_epochs(checkpoint: dict) -> int:
    """Completed epochs of one of our checkpoints (the official 'epoch' field)."""
    pre = checkpoint["config"]["pretrain"]
    # total_steps spans epochs * ipe_scale epochs; the small slack absorbs float rounding.
    return int(checkpoint["step"] * pre["epochs"] * pre["ipe_scale"] / checkpoint["total_steps"] + 1e-6)
