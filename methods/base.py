"""The contract every pretraining method fulfils, so the trainer and the tasks never name a method.

A method is an nn.Module holding its networks (`encoder`, optional `target_encoder` and
`predictor`) and declaring what it can do (`capabilities`). It knows how to:
- build its training views and batches (`train_transform`, `collate`),
- compute its loss on a batch (`training_step`), prepare the gradients (`prepare_gradients`:
  clipping) and update what is not trained by gradient (`after_step`, e.g. the EMA target
  encoder); `before_step` hands it the step for schedules of its own,
- hand out the encoder an evaluation uses (`eval_encoder(key)`: images -> patch tokens
  [B, N, D]), its geometry (`patch_size`, `grid`, `depth`, `token_dim`) and dense multi-level
  feature maps for segmentation (`dense_features`),
- call its predictor (`predict` on given positions, `predict_full` on a whole clean image) and
  replace it by a freshly initialised one (`reset_predictor`, the random-predictor control),
- read and write its official release layout, if it has one (`official_layout`).
Checkpoints hold the method's name and architecture next to its weights, so the registry
rebuilds the right class without the config that trained it.
"""

from __future__ import annotations

import numbers
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from benchmark.core.optim import param_groups
from benchmark.core.seeding import seeded
from methods.losses import normalize_targets

ENCODER_KEYS = ("target_encoder", "encoder")


@dataclass(frozen=True)
class Capabilities:
    """What a method offers the tasks; a task that needs more does not apply (and says why)."""

    predictor: bool  # a world model: predict / predict_full / reset_predictor
    target_encoder: bool  # an EMA target encoder whose (normalised) latents the predictor regresses
    conditioned: bool  # the predictor takes an action (what was done to the image)
    masks: bool = False  # draws context/target blocks as in pretraining (sample_masks)

    def missing(self, **needed: bool) -> str | None:
        """Why these capabilities are not enough (None when they are), e.g. missing(predictor=True)."""
        lacking = [name.replace("_", " ") for name, want in needed.items() if want and not getattr(self, name)]
        return f"it has no {' and no '.join(lacking)}" if lacking else None


def check_number(cfg: dict, key: str, minimum: float | None = None, integer: bool = False, strictly: bool = False):
    """A numeric setting of the method's section at dotted `key`; ValueError names `method.<key>`."""
    value: Any = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"method.{key} must be {kind}, got {value!r}")
    if minimum is not None and (value <= minimum if strictly else value < minimum):
        raise ValueError(f"method.{key} must be {'>' if strictly else '>='} {minimum}, got {value}")
    return value


def check_predictor(cfg: dict, model_cfg: dict, heads_default: bool = True) -> None:
    """A transformer predictor's depth, width and heads (null heads: the encoder's, when allowed)."""
    check_number(cfg, "predictor.depth", 0, integer=True)
    width = check_number(cfg, "predictor.width", 0, integer=True, strictly=True)
    heads = cfg["predictor"].get("num_heads")
    if heads is not None or not heads_default:
        heads = check_number(cfg, "predictor.num_heads", 0, integer=True, strictly=True)
    if width % (heads or model_cfg["num_heads"]):
        named = f"method.predictor.num_heads={heads}" if heads else f"the encoder's {model_cfg['num_heads']} heads"
        hint = " (method.predictor.num_heads; null takes the encoder's model.num_heads)" if heads_default else ""
        raise ValueError(f"method.predictor.width={width} is not divisible by {named}{hint}")


class Method(nn.Module, metaclass=ABCMeta):
    name: ClassVar[str]
    # The encoder tasks evaluate when the user names none (checkpoint_key=null).
    default_encoder_key: ClassVar[str] = "target_encoder"
    # The released checkpoint layout this method reads and writes (see `official_matches`), if any.
    official_layout: ClassVar[str | None] = None
    # How error messages describe a file in that layout.
    official_about: ClassVar[str] = ""
    # The official training step this method's step equals (`bench perf --official-ijepa` times
    # the two side by side), if any.
    official_step: ClassVar[str | None] = None
    # The official training input pipeline this method's views and batches equal (`bench perf
    # --data-path` times the two side by side): "ijepa", "mae" or "dino", if any.
    official_pipeline: ClassVar[str | None] = None
    # What `probe_features` can pool, and what the method's own paper probes linearly (the
    # linear probe's `pool: method`): the patch-token mean (I-JEPA) or a cls token (MAE).
    probe_pools: ClassVar[tuple[str, ...]] = ("mean",)
    probe_pool: ClassVar[str] = "mean"
    encoder: nn.Module
    target_encoder: nn.Module | None
    predictor: nn.Module | None

    def __init__(self, model_cfg: dict, method_cfg: dict, image_size: int):
        super().__init__()
        # Plain dicts: saved with every checkpoint and enough to rebuild the networks.
        self.model_cfg, self.method_cfg, self.image_size = dict(model_cfg), dict(method_cfg), image_size
        self.target_encoder = None
        self.predictor = None

    @classmethod
    def check_config(cls, method_cfg: dict, model_cfg: dict, image_size: int) -> None:
        """The method's own settings (its `method:` section), by type and range, before anything
        is built: ValueError naming the key. `bench run` calls it while validating the config; the
        model section and the image size are checked already."""

    # --- what the method offers --------------------------------------------------------------
    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """Declared per instance: an encoder-only checkpoint, for one, has no predictor."""

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def grid(self) -> int:
        """Patches per side at the pretraining resolution (the predictor's position table)."""
        return self.encoder.grid

    @property
    def depth(self) -> int:
        """Blocks of the encoder (`dense_features` numbers them 1..depth)."""
        return self.encoder.depth

    @property
    def token_dim(self) -> int:
        """Width of the eval encoder's tokens."""
        return self.encoder.embed_dim

    @property
    def token_heads(self) -> int:
        """Attention heads of the eval encoder (an attentive head over its tokens uses as many);
        1 for an encoder that declares none (no attention)."""
        return getattr(self.encoder, "num_heads", 1)

    @property
    def world_model_dim(self) -> int:
        """Width of `predict_full`'s outputs."""
        return self.token_dim

    @property
    def world_model_heads(self) -> int:
        """Attention heads of the network behind `predict_full`'s outputs; a predictor that maps back
        into the encoder's token space (I-JEPA, IWM) counts as the encoder."""
        return self.token_heads

    # --- data -----------------------------------------------------------------------------
    @abstractmethod
    def train_transform(self) -> Callable:
        """PIL image -> training view(s); random choices come from torch's global RNG."""

    @abstractmethod
    def collate(self, items: list) -> dict:
        """(view, label, batch_seed) items -> a batch dict; batch-level randomness from batch_seed."""

    # --- training -------------------------------------------------------------------------
    @abstractmethod
    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward pass and loss; returns at least {'loss': scalar tensor}."""

    def before_step(self, step: int, steps_per_epoch: int) -> None:
        """Called before each training step (0-based `step`): settings a method schedules itself
        (DINO's teacher temperature and frozen last layer go by the epoch)."""

    def prepare_gradients(self, clip_grad: float) -> None:
        """Between backward and the optimiser step: clip the global gradient norm to clip_grad
        (0: no clipping). A method whose recipe clips otherwise, or drops some gradients, says so."""
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(self.parameters(), clip_grad)

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step with progress in [0, 1] (EMA updates etc.)."""

    def param_groups(self) -> list[dict]:
        """Pretraining AdamW groups: decay on matrices and tokens, never on biases or 1-D
        parameters, as the official I-JEPA and MAE pretraining code groups them."""
        return param_groups(self, weight_decay=0.0, tokens=False)

    # --- evaluation -------------------------------------------------------------------------
    def eval_encoder(self, key: str = "target_encoder") -> nn.Module:
        """The encoder tasks evaluate: images [B, 3, H, W] -> patch tokens [B, N, token_dim]."""
        if key not in ENCODER_KEYS:
            raise ValueError(f"unknown encoder key {key!r} (choose {' or '.join(ENCODER_KEYS)})")
        if key == "target_encoder" and self.target_encoder is None:
            raise ValueError(f"method {self.name} has no target encoder: use checkpoint_key=encoder")
        return self.target_encoder if key == "target_encoder" else self.encoder

    def probe_features(self, images: torch.Tensor, key: str, pool: str) -> torch.Tensor:
        """One feature vector [B, token_dim] per image for a linear probe, pooled as `pool` (one of
        `probe_pools`) from the eval encoder's last layer."""
        if pool not in self.probe_pools:
            raise ValueError(
                f"method {self.name} cannot pool {pool!r} features (it offers {', '.join(self.probe_pools)})"
            )
        return self.eval_encoder(key)(images).mean(dim=1)

    @abstractmethod
    def dense_features(
        self, images: torch.Tensor, key: str, blocks: list[int]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Feature maps [B, token_dim, h, w] after each listed encoder block (1-based, in order)
        and the normed last layer, for images of any size that is a multiple of the patch size
        (position tables are resampled to the image's grid)."""

    def predict(
        self,
        context: torch.Tensor,
        ctx_idx: torch.Tensor,
        tgt_idx: torch.Tensor,
        action: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted latents at tgt_idx [B, Kt] from context tokens at ctx_idx [B, Kc].

        `extra` [B, T, D]: tokens in the encoder's space added to the predictor's input with no
        position (multitask predictor tuning's task tokens); the output is unchanged in shape.
        A method without a predictor (capabilities.predictor false) leaves this and
        `new_predictor` alone: the tasks that need them do not apply to it.
        """
        raise ValueError(f"method {self.name} has no predictor")

    def sample_masks(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Context positions [B, Kc] and target blocks (a list of [B, Kt]) as in pretraining.

        Needed by the world-model MRR, which applies to methods with a target encoder.
        """
        raise ValueError(f"method {self.name} does not draw context/target blocks")

    def encode_context(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder tokens of the patches at positions keep [B, K] only (a masked view)."""
        return self.encoder(images, keep=keep)

    def target_latents(self, images: torch.Tensor) -> torch.Tensor:
        """What the predictor is trained to match: layer-normed target-encoder tokens [B, N, D]."""
        if self.target_encoder is None:
            raise ValueError(f"method {self.name} has no target encoder, so no latent targets")
        return normalize_targets(self.target_encoder(images))

    def predict_full(
        self, tokens: torch.Tensor, action: torch.Tensor | None = None, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The world model run on a whole clean image: predictions [B, N, world_model_dim].

        `tokens` [B, N, D] are the encoder's patch tokens of the full image; the predictor gets
        all of them as context and a query at every position, with the null action unless one is
        given, plus the `extra` tokens (see `predict`). This is what predictor finetuning and
        dense tasks put their heads on.
        """
        idx = torch.arange(tokens.size(1), device=tokens.device).expand(tokens.size(0), -1)
        return self.predict(tokens, idx, idx, action, extra)

    def new_predictor(self) -> nn.Module:
        """A freshly initialised predictor of the same architecture (from torch's global RNG)."""
        raise ValueError(f"method {self.name} has no predictor")

    def reset_predictor(self, seed: int) -> nn.Module:
        """Replace the predictor by a fresh one drawn under `seed` (the random-predictor control),
        running the attention kernels the old one ran."""
        kernels = [m.fused_attn for m in self.predictor.modules() if hasattr(m, "fused_attn")]
        with seeded(seed):
            self.predictor = self.new_predictor()
        attentions = [m for m in self.predictor.modules() if hasattr(m, "fused_attn")]
        for module, fused in zip(attentions, kernels):
            module.fused_attn = fused
        return self.predictor

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "model_cfg": self.model_cfg,
            "method_cfg": self.method_cfg,
            "image_size": self.image_size,
            "weights": self.state_dict(),
        }

    @classmethod
    def official_matches(cls, state: dict) -> bool:
        """Whether a loaded file is in this method's official release layout."""
        return False

    @classmethod
    def official_architecture(cls, state: dict, path: Path) -> dict[str, object]:
        """Dotted config keys -> values read off an official file's tensors (compared with the config)."""
        raise ValueError(f"method {cls.name} has no official checkpoint layout")

    def load_official(self, state: dict, path: Path) -> None:
        """Load an official file's weights into this method, strictly (position tables resampled)."""
        raise ValueError(f"method {self.name} has no official checkpoint layout")

    def to_official(self, checkpoint: dict, encoder_only: bool = False) -> dict:
        """A checkpoint written by `bench run` (this method's weights) in the official release layout."""
        raise ValueError(f"method {self.name} has no official checkpoint layout")
