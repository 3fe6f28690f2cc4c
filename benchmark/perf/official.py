"""Our I-JEPA training step against the official code's, timed side by side in one process.

`bench perf --official-ijepa DIR` imports the official model, masks helpers and optimizer set-up
from a checkout of facebookresearch/ijepa (nothing of it is shipped here) and times its training
step against ours at the reference case, on exactly the same images and masks:

- both start from the same weights (the official models' weights, loaded into ours through the
  official checkpoint reader), so their first losses must agree;
- both run K prebuilt batches once untimed (every kernel for every mask shape is built), then
  alternate timed passes over the same K batches, in ABBA order so that a drift of the machine's
  speed falls on both alike;
- each pass's time per step is a mean over the same K mask draws, so the two sides do the same
  FLOPs per pass and the ratio of a pair of passes is the speed-up with the draws cancelled.

The official step is the sequence of its training loop's step (src/train.py): target encoder
without gradients, layer norm, target blocks gathered and repeated, context encoder, predictor,
smooth L1, backward, AdamW with its warmup-cosine and weight-decay schedules, gradient
statistics, EMA of the target encoder. Its `torch.cuda.amp.autocast` would leave a CPU step in
fp32, so under bf16 the same region runs under `torch.autocast` on the step's device.
"""

from __future__ import annotations

import copy
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmark.perf.common import PerfError, _method_and_data, training_step

# The `official_step` a method declares when its training step is the one timed here.
OFFICIAL_STEP = "ijepa"
OFFICIAL_FILES = ("src/models/vision_transformer.py", "src/helper.py", "src/masks/utils.py", "src/utils/tensors.py")


class OfficialCodeError(PerfError):
    """A folder that is not a usable checkout of the official code."""


def import_official_ijepa(checkout: str | Path) -> dict:
    """The official modules, imported from a checkout (its `src` package goes first on sys.path)."""
    root = Path(checkout).expanduser().absolute()
    missing = [name for name in OFFICIAL_FILES if not (root / name).is_file()]
    if missing:
        raise OfficialCodeError(
            f"{root} is not a checkout of facebookresearch/ijepa: {', '.join(missing)} not found "
            "(git clone https://github.com/facebookresearch/ijepa)"
        )
    sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[name]  # another project's `src` must not stand in for the official one
    try:
        return {
            "vit": importlib.import_module("src.models.vision_transformer"),
            "helper": importlib.import_module("src.helper"),
            "masks": importlib.import_module("src.masks.utils"),
            "tensors": importlib.import_module("src.utils.tensors"),
            "logging": importlib.import_module("src.utils.logging"),
        }
    except Exception as e:  # noqa: BLE001 - any import failure means the same thing to the user
        raise OfficialCodeError(f"the official code in {root} does not import here: {type(e).__name__}: {e}") from e


class OfficialStep:
    """The official I-JEPA training step on CPU or GPU, built by the official helpers."""

    def __init__(self, code: dict, model: str, image_size: int, patch_size: int, depth: int, width: int, cfg):
        torch.manual_seed(0)
        helper = code["helper"]
        if not hasattr(code["vit"], model):
            raise OfficialCodeError(f"the official code has no model {model} (it has vit_tiny ... vit_gigantic)")
        self.encoder, self.predictor = helper.init_model(
            torch.device("cpu"), patch_size, model, image_size, pred_depth=depth, pred_emb_dim=width
        )
        self.target_encoder = copy.deepcopy(self.encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad = False
        # The schedules only have to exist (their values do not change what a step costs): a
        # warm-up epoch of 1000 steps out of 2, from the run's own lr and weight-decay settings.
        self.optimizer, _, self.scheduler, self.wd_scheduler = helper.init_opt(
            self.encoder,
            self.predictor,
            iterations_per_epoch=1000,
            start_lr=cfg.start_lr,
            ref_lr=cfg.lr,
            warmup=1,
            num_epochs=2,
            wd=cfg.weight_decay,
            final_wd=cfg.final_weight_decay,
            final_lr=cfg.final_lr,
        )
        self.momentum = 0.996  # the first value of the official EMA schedule
        self.apply_masks = code["masks"].apply_masks
        self.repeat = code["tensors"].repeat_interleave_batch
        self.grad_logger = code["logging"].grad_logger

    def state(self) -> dict:
        """The weights in the official checkpoint layout."""
        return {
            "encoder": self.encoder.state_dict(),
            "predictor": self.predictor.state_dict(),
            "target_encoder": self.target_encoder.state_dict(),
        }

    def to(self, device: torch.device) -> OfficialStep:
        for module in (self.encoder, self.predictor, self.target_encoder):
            module.to(device)
        return self

    def __call__(self, batch: dict, bf16: bool) -> float:
        imgs, masks_enc, masks_pred = batch["images"], [batch["ctx_idx"]], list(batch["tgt_idx"])
        self.scheduler.step()
        self.wd_scheduler.step()
        with torch.autocast(device_type=imgs.device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                h = self.target_encoder(imgs)
                h = F.layer_norm(h, (h.size(-1),))
                h = self.apply_masks(h, masks_pred)
                h = self.repeat(h, len(imgs), repeat=len(masks_enc))
            z = self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)
            loss = F.smooth_l1_loss(z, h)
        loss.backward()
        self.optimizer.step()
        self.grad_logger(self.encoder.named_parameters())
        self.optimizer.zero_grad()
        with torch.no_grad():
            for q, k in zip(self.encoder.parameters(), self.target_encoder.parameters()):
                k.data.mul_(self.momentum).add_((1.0 - self.momentum) * q.detach().data)
        return loss.item()


def time_against_official(
    checkout: str, overrides: list[str], batches: int, pairs: int, device: str, threads: int | None
) -> dict:
    """Paired passes of our step and the official one over the same prebuilt batches (one case)."""
    from benchmark.config import load_config
    from benchmark.core.layers import to_device
    from benchmark.core.loading import train_loader

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cfg = load_config(overrides)
    pcfg, mcfg = cfg.pretrain, cfg.method
    from methods import METHODS

    step = METHODS[cfg.method.name].official_step
    if step != OFFICIAL_STEP:
        raise OfficialCodeError(
            f"the official I-JEPA step times a method whose step is I-JEPA's (official_step), not {cfg.method.name}"
        )
    code = import_official_ijepa(checkout)
    official = OfficialStep(
        code,
        cfg.model.name,
        cfg.data.image_size,
        cfg.model.patch_size,
        mcfg.predictor.depth,
        mcfg.predictor.width,
        pcfg,
    )
    method, dataset = _method_and_data(cfg, torch.device("cpu"))
    method.load_official(official.state(), Path(checkout))
    method.to(dev).train()
    official.to(dev)
    train, _ = training_step(cfg, method, len(dataset), dev)
    loader = train_loader(dataset, method.train_transform(), method.collate, pcfg.batch_size, cfg.seed, 0, workers=0)
    prebuilt = [to_device(b, dev) for _, b in zip(range(batches), loader)]
    bf16 = bool(pcfg.bf16)
    count = [0]

    def ours(batch: dict) -> float:
        count[0] += 1
        return train(count[0] - 1, batch)

    def theirs(batch: dict) -> float:
        return official(batch, bf16)

    def one_pass(step) -> tuple[float, list[float]]:
        start = time.perf_counter()
        losses = [step(b) for b in prebuilt]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - start) / len(prebuilt), losses

    # The untimed pass builds every kernel for every mask shape; its first losses come from the
    # same weights on the same batch.
    _, first_ours = one_pass(ours)
    _, first_theirs = one_pass(theirs)
    times = {"ours": [], "official": []}
    for i in range(pairs):
        order = ("ours", "official") if i % 2 == 0 else ("official", "ours")
        for side in order:
            times[side].append(one_pass(ours if side == "ours" else theirs)[0])
    ratios = [t / o for o, t in zip(times["ours"], times["official"])]
    return {
        "ours": times["ours"],
        "official": times["official"],
        "ratios": ratios,
        "speedup": statistics.median(ratios),
        "first_loss": {"ours": first_ours[0], "official": first_theirs[0]},
        "batches": len(prebuilt),
        "pairs": pairs,
        "threads": torch.get_num_threads(),
    }
