"""DINO (arXiv 2104.14294): self-distillation with no labels, the invariant end of the spectrum.

A student ViT and its EMA teacher each carry a DINO head (an MLP to a 256-wide bottleneck,
L2-normalised, then a weight-normalised linear layer to `out_dim` prototypes). The teacher sees
the 2 global crops of an image, the student those and the local crops; the loss is the
cross-entropy between the teacher's centred, sharpened softmax on one global crop and the
student's softmax on every other crop. After each step the teacher follows the student with a
cosine momentum schedule and the centre follows the teacher's batch mean.

The recipe is that of facebookresearch/dino `main_dino.py`: its augmentations, its head and
initialisation, the teacher-temperature warmup per epoch, the last layer's gradients dropped
during the first `freeze_last_layer` epochs, gradient clipping per parameter (not over the
global norm), the lr reaching its peak on the last warmup step (pretrain/dino_cpu.yaml).

DINO has no predictor and draws no masks: the predictor tasks and the world-model MRR do not
apply to it. Its evaluation feature is the teacher's last-layer cls token (`probe_pool: cls`),
the feature of the official k-NN and linear evaluations.

Also the official release layouts, read and written here:
- `dino_deitsmall16_pretrain.pth`: the teacher backbone's state dict alone (cls_token,
  pos_embed [1, 1 + N, D], patch_embed, blocks, norm);
- the full training checkpoint (`checkpoint.pth`, `..._full_checkpoint.pth`): {'student': the
  student under DDP ('module.backbone.*', 'module.head.*'), 'teacher': ('backbone.*', 'head.*'),
  'optimizer', 'epoch', 'args', 'dino_loss': {'center'}}.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.core import distributed
from benchmark.core.checkpoint import load_weights, strip_prefix
from benchmark.core.errors import CheckpointError
from benchmark.core.layers import LayerNorm
from benchmark.core.schedules import cosine
from benchmark.core.transforms import MultiCrop
from methods.base import Capabilities, Method, check_number
from methods.ijepa import completed_epochs
from methods.losses import ema_update
from methods.vit import (
    PatchEmbed,
    encoder_levels,
    make_blocks,
    resample_pos_embed,
    set_geometry,
    tensor_shape,
    vit_architecture,
)

STUDENT_PREFIX, BACKBONE, HEAD = "module.", "backbone.", "head."


# --- networks --------------------------------------------------------------------------------
class DINOBackbone(nn.Module):
    """DINO's ViT: a cls token and learned positions (cls slot first), pre-LN blocks, final norm.

    `forward(images)` gives the patch tokens [B, N, D] (what tasks evaluate), `cls_features`
    the normed cls token [B, D] (DINO's feature). Images of another size take the position
    table resampled as the official code does it (`position_table`).
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        in_chans: int = 3,
    ):
        super().__init__()
        set_geometry(self, img_size, patch_size, embed_dim, depth, num_heads)
        # Registered in the official order (parameters, then patch_embed, blocks, norm), which
        # is also the order of the official optimizer's state.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path)
        self.norm = LayerNorm(embed_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_dino_weights)  # the patch convolution keeps torch's default, as officially

    def position_table(self, h: int, w: int) -> torch.Tensor:
        """[1, 1 + h*w, D] for an h x w patch grid. Resampled bicubically with the official scale
        factors ((h + 0.1) / g, (w + 0.1) / g), which sample the table at other points than
        resizing to an exact size would."""
        if h == w == self.grid:
            return self.pos_embed
        table = self.pos_embed[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(
            table, scale_factor=((h + 0.1) / self.grid, (w + 0.1) / self.grid), mode="bicubic", align_corners=False
        )
        table = table.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([self.pos_embed[:, :1], table], dim=1)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, D], the cls token first, after the final norm."""
        h, w = images.size(-2) // self.patch_size, images.size(-1) // self.patch_size
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1) + self.position_table(h, w)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(images)[:, 1:]

    def cls_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(images)[:, 0]


def init_dino_weights(module: nn.Module) -> None:
    """The official ViT and head initialisation: truncated normal 0.02 linears, zero biases, unit
    LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class WeightNormLinear(nn.Module):
    """A linear layer without bias whose weight is g * v / |v| per output row: torch's weight
    normalisation (dim 0), with its parameter names, so released heads load key for key."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        reference = nn.Linear(in_dim, out_dim, bias=False)  # torch's default init of v
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = nn.Parameter(reference.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)))


class DINOHead(nn.Module):
    """MLP (nlayers linears, GELU between) to the bottleneck, L2 normalisation, then the
    weight-normalised prototype layer; `norm_last_layer` freezes its norms g at 1."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        self.apply(init_dino_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


def dino_loss(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float, student_temp: float
) -> torch.Tensor:
    """Mean over (global teacher crop, other student crop) pairs of the cross-entropy between the
    teacher's centred softmax at teacher_temp and the student's log-softmax at student_temp.

    student [C * B, K] holds C crops, the 2 global ones first; teacher [2 * B, K] the teacher's
    outputs on the global crops. A crop is never compared with itself.
    """
    globals_ = 2
    crops = globals_ * student.size(0) // teacher.size(0)
    # In float32 whatever the autocast: the official loss multiplies and sums elementwise, which
    # autocast leaves in float32, where a bf16 contraction over 65k prototypes would round.
    with torch.autocast(student.device.type, enabled=False):
        log_p = F.log_softmax(student.float() / student_temp, dim=-1).reshape(crops, -1, student.size(-1))
        q = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach()
        q = q.reshape(globals_, -1, teacher.size(-1))
        cross = -torch.einsum("tbk,sbk->tsb", q, log_p).mean(dim=-1)  # [teacher crop, student crop]
    same = torch.eye(globals_, crops, dtype=torch.bool, device=cross.device)
    return cross.masked_fill(same, 0.0).sum() / (globals_ * crops - globals_)


def by_size(crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive crops of one size stacked into one batch (one encoder pass per resolution)."""
    groups: list[list[torch.Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return [torch.cat(group) for group in groups]


# --- the method ------------------------------------------------------------------------------
class DINO(Method):
    """DINO: student and EMA teacher with DINO heads, multi-crop, centring and sharpening."""

    name = "dino"
    official_layout = "dino"
    official_pipeline = "dino"
    official_about = "a DINO checkpoint (student/teacher, or a backbone state dict)"
    # The official k-NN and linear evaluations read the cls token; the patch mean is offered too.
    probe_pools = ("cls", "mean")
    probe_pool = "cls"

    @classmethod
    def check_config(cls, method_cfg: dict, model_cfg: dict, image_size: int) -> None:
        for key in ("head.out_dim", "head.hidden_dim", "head.bottleneck_dim", "head.nlayers"):
            check_number(method_cfg, key, 1, integer=True)
        if not isinstance(method_cfg["head"].get("norm_last_layer"), bool):
            raise ValueError(
                f"method.head.norm_last_layer must be true or false, got {method_cfg['head'].get('norm_last_layer')!r}"
            )
        check_number(method_cfg, "local_crops.number", 0, integer=True)
        size = check_number(method_cfg, "local_crops.size", 1, integer=True)
        if size % model_cfg["patch_size"]:
            raise ValueError(
                f"method.local_crops.size={size} is not a multiple of model.patch_size={model_cfg['patch_size']}"
            )
        for key in ("global_crops.scale", "local_crops.scale", "blur_radius"):
            value = method_cfg
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            upper = math.inf if key == "blur_radius" else 1.0
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and 0 < value[0] <= value[1] <= upper):
                bound = "" if key == "blur_radius" else " <= 1"
                raise ValueError(f"method.{key} must be [low, high] with 0 < low <= high{bound}, got {value!r}")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            check_number(method_cfg, key, 0, strictly=True)
        check_number(method_cfg, "warmup_teacher_temp_epochs", 0, integer=True)
        check_number(method_cfg, "freeze_last_layer", 0, integer=True)
        for key in ("momentum_teacher", "center_momentum"):
            if not 0.0 <= check_number(method_cfg, key, 0) <= 1.0:
                raise ValueError(f"method.{key} must be in [0, 1], got {method_cfg[key]}")
        if method_cfg.get("drop_path") is not None:
            check_number(method_cfg, "drop_path", 0)

    def __init__(self, model_cfg: dict, method_cfg: dict, image_size: int):
        super().__init__(model_cfg, method_cfg, image_size)
        self.check_config(method_cfg, model_cfg, image_size)
        drop_path = method_cfg.get("drop_path")
        # Registration order: the student (encoder, head) first, as in the official optimizer.
        self.encoder = self._backbone(model_cfg.get("drop_path", 0.0) if drop_path is None else drop_path)
        self.head = self._head(method_cfg["head"]["norm_last_layer"])
        # The teacher: no stochastic depth, the student's initial weights, no gradients.
        self.target_encoder = self._backbone(0.0)
        self.target_head = self._head(True)
        self.target_encoder.load_state_dict(self.encoder.state_dict())
        self.target_head.load_state_dict(self.head.state_dict())
        self.target_encoder.requires_grad_(False)
        self.target_head.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, method_cfg["head"]["out_dim"]))
        self._epoch = 0
        self._batch_center: torch.Tensor | None = None
        self._ema_pairs: tuple[list, list] | None = None

    def _backbone(self, drop_path: float) -> DINOBackbone:
        m = self.model_cfg
        return DINOBackbone(
            self.image_size,
            m["patch_size"],
            m["embed_dim"],
            m["depth"],
            m["num_heads"],
            m.get("mlp_ratio", 4.0),
            drop_path,
        )

    def _head(self, norm_last_layer: bool) -> DINOHead:
        h = self.method_cfg["head"]
        return DINOHead(
            self.model_cfg["embed_dim"],
            h["out_dim"],
            h["hidden_dim"],
            h["bottleneck_dim"],
            h["nlayers"],
            norm_last_layer,
        )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(predictor=False, target_encoder=True, conditioned=False)

    # --- data -----------------------------------------------------------------------------
    def train_transform(self) -> MultiCrop:
        c = self.method_cfg
        return MultiCrop(
            self.image_size,
            c["local_crops"]["size"],
            c["local_crops"]["number"],
            c["global_crops"]["scale"],
            c["local_crops"]["scale"],
            c["blur_radius"],
        )

    def collate(self, items: list) -> dict:
        views, labels, _ = zip(*items)
        crops = [torch.stack([v[i] for v in views]) for i in range(len(views[0]))]
        return {"crops": crops, "labels": torch.tensor(labels)}

    # --- training -------------------------------------------------------------------------
    def teacher_temp(self, epoch: int) -> float:
        """Linear from warmup_teacher_temp to teacher_temp over the warmup epochs (both ends
        included, as numpy's linspace), then constant."""
        c = self.method_cfg
        start, end, warm = c["warmup_teacher_temp"], c["teacher_temp"], c["warmup_teacher_temp_epochs"]
        if epoch >= warm:
            return end
        return start if warm == 1 else start + (end - start) * epoch / (warm - 1)

    def before_step(self, step: int, steps_per_epoch: int) -> None:
        self._epoch = step // steps_per_epoch

    def outputs(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(student [C * B, out_dim] on every crop, teacher [2 * B, out_dim] on the global ones)."""
        with torch.no_grad():
            teacher = self.target_head(self.target_encoder.cls_features(torch.cat(crops[:2])))
        student = self.head(torch.cat([self.encoder.cls_features(group) for group in by_size(crops)]))
        return student, teacher

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        student, teacher = self.outputs(batch["crops"])
        loss = dino_loss(student, teacher, self.center, self.teacher_temp(self._epoch), self.method_cfg["student_temp"])
        # The centre moves after the step (after_step), so a checkpoint written between this
        # forward and the update holds the centre this step used.
        self._batch_center = teacher.detach().float().mean(dim=0, keepdim=True)
        return {"loss": loss}

    def prepare_gradients(self, clip_grad: float) -> None:
        """DINO clips each parameter's gradient norm to clip_grad on its own, then drops the
        prototype layer's gradients during the first freeze_last_layer epochs."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if clip_grad and grads:
            for grad, norm in zip(grads, torch._foreach_norm(grads)):
                grad.mul_(torch.clamp(clip_grad / (norm + 1e-6), max=1.0))
        if self._epoch < self.method_cfg["freeze_last_layer"]:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def teacher_momentum(self, progress: float) -> float:
        return cosine(progress, 1.0, self.method_cfg["momentum_teacher"], 1.0)

    def after_step(self, progress: float) -> None:
        if self._ema_pairs is None:
            teacher = [*self.target_encoder.parameters(), *self.target_head.parameters()]
            student = [*self.encoder.parameters(), *self.head.parameters()]
            self._ema_pairs = (teacher, student)
        with torch.no_grad():
            ema_update(*self._ema_pairs, self.teacher_momentum(progress))
            if self._batch_center is not None:
                m = self.method_cfg["center_momentum"]
                self.center.mul_(m).add_(distributed.mean(self._batch_center), alpha=1.0 - m)
                self._batch_center = None

    # --- evaluation ---------------------------------------------------------------------------
    def probe_features(self, images, key, pool):
        if pool == "cls":
            return self.eval_encoder(key).cls_features(images)
        return super().probe_features(images, key, pool)

    def dense_features(self, images, key, blocks):
        encoder = self.eval_encoder(key)
        return encoder_levels(encoder, images, blocks, cls_token=encoder.cls_token, positions=encoder.position_table)

    # --- the official release layouts -------------------------------------------------------------
    @classmethod
    def official_matches(cls, state: dict) -> bool:
        full = isinstance(state.get("student"), dict) and isinstance(state.get("teacher"), dict)
        return full or all(isinstance(state.get(k), torch.Tensor) for k in ("cls_token", "pos_embed", "norm.weight"))

    @classmethod
    def _official_parts(cls, state: dict, path: Path) -> dict[str, dict]:
        """{'encoder', 'target_encoder'[, 'head', 'target_head']}: state dicts without prefixes."""
        if not isinstance(state.get("student"), dict):
            return {"encoder": dict(state), "target_encoder": dict(state)}
        parts = {}
        for role, prefix in (("student", STUDENT_PREFIX), ("teacher", "")):
            weights = state[role]
            stray = [k for k in weights if not k.startswith(prefix + BACKBONE) and not k.startswith(prefix + HEAD)]
            if stray:
                raise CheckpointError(f"{path} '{role}' holds {stray[0]!r}: a DINO file holds backbone.* and head.*")
            weights = strip_prefix(weights, prefix) if prefix else weights
            name = "" if role == "student" else "target_"
            parts[name + "encoder"] = strip_prefix(
                {k: v for k, v in weights.items() if k.startswith(BACKBONE)}, BACKBONE
            )
            parts[name + "head"] = strip_prefix({k: v for k, v in weights.items() if k.startswith(HEAD)}, HEAD)
        return parts

    @classmethod
    def official_architecture(cls, state: dict, path: Path) -> dict[str, object]:
        parts = cls._official_parts(state, path)
        found = vit_architecture(parts["target_encoder"], 1, f"{path} teacher backbone")
        if "target_head" in parts:
            head, what = parts["target_head"], f"{path} teacher head"
            out_dim, bottleneck = tensor_shape(head, "last_layer.weight_v", what)
            found["method.head.out_dim"], found["method.head.bottleneck_dim"] = out_dim, bottleneck
            linears = sorted(int(k.split(".")[1]) for k in head if k.startswith("mlp.") and k.endswith(".weight"))
            found["method.head.nlayers"] = max(1, len(linears))
            if len(linears) > 1:
                found["method.head.hidden_dim"] = tensor_shape(head, f"mlp.{linears[0]}.weight", what)[0]
        return found

    def load_official(self, state: dict, path: Path) -> None:
        parts = self._official_parts(state, path)
        for name, weights in parts.items():
            if isinstance(weights.get("pos_embed"), torch.Tensor):
                weights["pos_embed"] = resample_pos_embed(weights["pos_embed"], self.grid, self.grid, prefix_tokens=1)
            load_weights(getattr(self, name), weights, f"{path} '{name}'")
        loss_state = state.get("dino_loss")
        center = loss_state.get("center") if isinstance(loss_state, dict) else None
        if isinstance(center, torch.Tensor):
            if center.shape != self.center.shape:
                raise CheckpointError(
                    f"{path} 'dino_loss.center' is {tuple(center.shape)}, not {tuple(self.center.shape)}"
                )
            self.center.copy_(center)

    def to_official(self, checkpoint: dict, encoder_only: bool = False) -> dict:
        """The full training checkpoint `main_dino.py` resumes from, or with encoder_only the
        teacher backbone alone (the `..._pretrain.pth` layout)."""
        backbone = {k: v.clone() for k, v in self.target_encoder.state_dict().items()}
        if encoder_only:
            return backbone
        student = {
            STUDENT_PREFIX + prefix + k: v.clone()
            for prefix, part in ((BACKBONE, self.encoder), (HEAD, self.head))
            for k, v in part.state_dict().items()
        }
        teacher = {
            prefix + k: v.clone()
            for prefix, part in ((BACKBONE, self.target_encoder), (HEAD, self.target_head))
            for k, v in part.state_dict().items()
        }
        # Our pretraining groups are the official two (regularised, then not), their parameters
        # in the same order, so the state maps index for index.
        optimizer = checkpoint["optimizer"]
        groups = []
        for group in optimizer["param_groups"]:
            group = {k: v for k, v in group.items() if k not in ("lr_scale", "apply_wd")}
            groups.append(dict(group, fused=None, foreach=None))
        pre, c = checkpoint["config"]["pretrain"], self.method_cfg
        args = argparse.Namespace(
            arch=self.model_cfg.get("name", "vit"),
            patch_size=self.patch_size,
            out_dim=c["head"]["out_dim"],
            norm_last_layer=c["head"]["norm_last_layer"],
            momentum_teacher=c["momentum_teacher"],
            warmup_teacher_temp=c["warmup_teacher_temp"],
            teacher_temp=c["teacher_temp"],
            warmup_teacher_temp_epochs=c["warmup_teacher_temp_epochs"],
            weight_decay=pre["weight_decay"],
            weight_decay_end=pre["final_weight_decay"],
            clip_grad=pre["clip_grad"],
            batch_size_per_gpu=pre["batch_size"],
            epochs=pre["epochs"],
            freeze_last_layer=c["freeze_last_layer"],
            lr=pre["lr"] * 256 / pre["batch_size"],  # the official lr is per 256 images
            warmup_epochs=pre["warmup_epochs"],
            min_lr=pre["final_lr"],
            global_crops_scale=tuple(c["global_crops"]["scale"]),
            local_crops_number=c["local_crops"]["number"],
            local_crops_scale=tuple(c["local_crops"]["scale"]),
        )
        return {
            "student": student,
            "teacher": teacher,
            "optimizer": {"state": optimizer["state"], "param_groups": groups},
            "epoch": completed_epochs(checkpoint),
            "args": args,
            "dino_loss": {"center": self.center.detach().clone()},
        }
