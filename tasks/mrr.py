"""World-model quality: mean reciprocal rank (MRR) of the true transformation among a bank.

For each evaluation image: one shared crop; a source view (colour jitter + destructive
transforms, masked into context and target blocks as in pretraining) and a bank of `bank_size`
target views of the same crop, each with its own colour jitter. The target encoder encodes every
bank view; the predictor, told the action from the source to bank view 0 (the true target),
predicts the target blocks' latents; bank views are ranked by the distance of their latents to
the prediction at the predicted positions. MRR = mean over images of 1 / rank of the true view.

1 means the world model applies the transformation it is told (equivariant); a predictor the
action cannot reach ranks the true view uniformly at random, whose expectation is
H(bank_size) / bank_size (`chance_mrr`), not 0: bank views are exchangeable draws.

Every method is ranked on the same transformation distribution, set in this task's config, so
MRR compares world models rather than pretraining recipes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from benchmark.core.errors import ConfigError
from benchmark.core.progress import progress_bar
from benchmark.core.seeding import derive_seed
from benchmark.core.stats import Evidence, fingerprint
from benchmark.core.views import (
    PairedViews,
    Photometric,
    ViewConfig,
    action,
    apply_photometric,
    draw_jitter,
    draw_source,
)
from tasks.base import Applies, Flag, Number, Task, TaskContext

GRID_FILE = "mrr_retrievals.png"


# The bank goes through the target encoder this many views at a time (the default bank is one
# chunk); a chunk's activations stay under ~BANK_CHUNK_BYTES per view at the CPU scale.
BANK_CHUNK = 256
BANK_CHUNK_BYTES = 2 * 2**20


def available_memory() -> int | None:
    """Bytes of memory the kernel says a new allocation can get (Linux MemAvailable), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def chance_mrr(bank_size: int) -> float:
    """Expected reciprocal rank when the true entry's rank is uniform on 1..bank_size."""
    return sum(1.0 / k for k in range(1, bank_size + 1)) / bank_size


def rank_of_first(distances: torch.Tensor) -> torch.Tensor:
    """Rank (1 = closest) of entry 0 in each row of distances [..., N]; ties share the mid rank.

    Mid ranks keep a collapsed model (every distance equal) near 2/N instead of scoring a
    perfect 1 (optimistic ties) or the worst possible 1/N (pessimistic ties).
    """
    true = distances[..., :1]
    closer = (distances[..., 1:] < true).sum(-1)
    tied = (distances[..., 1:] == true).sum(-1)
    return 1.0 + closer + tied / 2.0


def block_distances(pred: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Mean squared distance [N] between one prediction [K, D] and bank latents [N, K, D]."""
    return (bank.float() - pred.float().unsqueeze(0)).pow(2).mean(dim=(1, 2))


def to_pil(x: torch.Tensor, size: int) -> Image.Image:
    """An RGB tensor in [0, 1] ([3, H, W]) as a PIL image upscaled to size x size (nearest)."""
    array = (x.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array).resize((size, size), Image.NEAREST)


def retrieval_grid(rows: list[dict], path: Path, cell: int = 96, pad: int = 4) -> None:
    """One row per image: source | true target | top-k retrieved bank views (true one outlined).

    Each row dict holds 'source' and 'target' views and 'retrieved': [(view, is_true)], best first.
    """
    columns = 2 + max(len(r["retrieved"]) for r in rows)
    header = 16
    width, height = columns * (cell + pad) + pad, header + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    titles = ["source", "true target"] + [f"top {k + 1}" for k in range(columns - 2)]
    for c, title in enumerate(titles):
        draw.text((pad + c * (cell + pad), 2), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        y = header + pad + r * (cell + pad)
        tiles = [(row["source"], False), (row["target"], False)] + [(v, t) for v, t in row["retrieved"]]
        for c, (view, is_true) in enumerate(tiles):
            x = pad + c * (cell + pad)
            canvas.paste(to_pil(view, cell), (x, y))
            if is_true:
                draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=(0, 200, 0), width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


class WorldModelMRR(Task):
    """World-model MRR: rank the true photometric transformation among a bank by predicted latents."""

    name = "mrr"
    headline = "mrr"
    settings = {
        "bank_size": Number(2, integer=True),
        "num_images": Number(1, integer=True),
        "bf16": Flag(),
        "grid_images": Number(0, integer=True),
        "grid_top_k": Number(1, integer=True),
    }

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        cfg = self.cfg
        try:
            self.views = ViewConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["views"].items()})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"tasks.mrr.views: {exc}") from None
        if cfg["grid_top_k"] > cfg["bank_size"]:
            raise ConfigError(
                f"tasks.mrr.grid_top_k={cfg['grid_top_k']} is more than the bank_size={cfg['bank_size']} entries "
                "it shows the top of"
            )

    def check(self, method) -> None:
        # The bank's latents at the target patches are kept for ranking (at most every patch).
        needed = self.cfg["bank_size"] * method.grid**2 * method.token_dim * 4 + BANK_CHUNK * BANK_CHUNK_BYTES
        available = available_memory()
        if available is not None and needed > available:
            raise ConfigError(
                f"tasks.mrr.bank_size={self.cfg['bank_size']} needs about {needed / 2**30:.1f} GiB for the bank's "
                f"latents; {available / 2**30:.1f} GiB is available: lower bank_size"
            )

    def check_data(self, source, sizes: dict[str, int]) -> None:
        if self.cfg["num_images"] > sizes["val"]:
            raise ConfigError(
                f"tasks.mrr.num_images={self.cfg['num_images']} is more than the {sizes['val']} val images it "
                "draws from"
            )

    def applies_to(self, method) -> Applies:
        # Ranking happens in the target encoder's latent space, which the predictor regresses;
        # an unconditioned predictor still applies (it scores chance, by construction).
        return Applies.needs(method, predictor=True, target_encoder=True, masks=True)

    def run(self, method, ctx: TaskContext) -> dict:
        cfg = self.cfg
        views = replace(self.views, image_size=ctx.source.image_size)
        # Bank entries are always jittered: with the training jitter probability, ~20% of them
        # would be the identity, i.e. exact duplicates that tie.
        bank_views = replace(views, jitter=1.0)
        crops = PairedViews(views)
        dataset = ctx.source.split("val")
        count = min(cfg["num_images"], len(dataset))
        # A seeded sample: ImageFolder orders images by class, the first few would share one.
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(ctx.seed))[:count].tolist()
        device, bank_size = ctx.device, cfg["bank_size"]
        method = method.to(device).eval()
        autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bool(cfg["bf16"]))

        ranks, grid_rows = [], []
        with torch.no_grad(), progress_bar("mrr", count, enabled=ctx.show_progress) as bar:
            for n, index in enumerate(chosen):
                image, _ = dataset[index]
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derive_seed(ctx.seed, index))
                    crop = crops.shared_crop(image)
                    source = draw_source(views)
                    bank = [draw_jitter(bank_views) for _ in range(bank_size)]
                    ctx_idx, tgt_blocks = method.sample_masks(
                        1, torch.Generator().manual_seed(derive_seed(ctx.seed, index, 1))
                    )
                rank, order = self._rank(
                    method, crops, crop, source, bank, ctx_idx, tgt_blocks, views, device, autocast
                )
                ranks.append(rank)
                if n < cfg["grid_images"]:
                    grid_rows.append(self._grid_row(crop, source, bank, order, views, cfg["grid_top_k"]))
                bar.advance()
        ranks_t = torch.tensor(ranks, dtype=torch.float64)
        reciprocal = 1.0 / ranks_t
        grid_path = ctx.run_dir / GRID_FILE
        if grid_rows:
            retrieval_grid(grid_rows, grid_path)
        # The examples: which images, and the seed of their crops and banks, under the same views.
        examples = fingerprint(ctx.val_fingerprint(), chosen, ctx.seed, bank_size, sorted(self.cfg["views"].items()))
        return {
            "mrr": reciprocal.mean().item(),
            "evidence": Evidence("reciprocal_rank", {"reciprocal_rank": reciprocal.numpy()}, examples),
            "mrr_stderr": (reciprocal.std(unbiased=True) / math.sqrt(len(ranks))).item() if len(ranks) > 1 else 0.0,
            "chance_mrr": chance_mrr(bank_size),
            "top1_retrieval": 100.0 * (ranks_t == 1).double().mean().item(),
            "median_rank": ranks_t.median().item(),
            "bank_size": bank_size,
            "num_images": len(ranks),
            "conditioning": method.method_cfg.get("predictor", {}).get("conditioning", "none")
            if method.capabilities.conditioned
            else "none",
            "retrieval_grid": str(grid_path) if grid_rows else None,
        }

    @staticmethod
    def _rank(
        method,
        crops: PairedViews,
        crop: torch.Tensor,
        source: Photometric,
        bank: list[Photometric],
        ctx_idx: torch.Tensor,
        tgt_blocks: list[torch.Tensor],
        views: ViewConfig,
        device: torch.device,
        autocast: dict,
    ) -> tuple[float, torch.Tensor]:
        """Rank of the true view (bank entry 0) and the bank order by distance."""
        threshold = views.solarize_threshold
        source_view = crops.normalize(apply_photometric(crop, source, threshold)).unsqueeze(0).to(device)
        ctx_idx = ctx_idx.to(device)
        blocks = torch.cat([b.to(device) for b in tgt_blocks])  # [num_blocks, Kt]
        true_action = action(bank[0], source).unsqueeze(0).to(device)
        flat = blocks.reshape(-1)
        at_blocks = []  # [chunk, num_blocks * Kt, D]: the bank's latents at the target patches
        for start in range(0, len(bank), BANK_CHUNK):
            bank_views = crops.normalize(apply_photometric(crop, bank[start : start + BANK_CHUNK], threshold))
            with torch.autocast(**autocast):
                at_blocks.append(method.target_latents(bank_views.to(device))[:, flat])
        with torch.autocast(**autocast):
            context = method.encode_context(source_view, ctx_idx)
            n = blocks.size(0)
            # One predictor pass per target block, as in pretraining.
            pred = method.predict(context.repeat(n, 1, 1), ctx_idx.repeat(n, 1), blocks, true_action.repeat(n, 1))
        bank_at_blocks = torch.cat(at_blocks)
        distances = block_distances(pred.reshape(-1, pred.size(-1)), bank_at_blocks)
        return rank_of_first(distances).item(), distances.argsort().cpu()

    @staticmethod
    def _grid_row(crop, source, bank, order, views: ViewConfig, top_k: int) -> dict:
        top = order[:top_k].tolist()
        rendered = apply_photometric(crop, [source, bank[0]] + [bank[j] for j in top], views.solarize_threshold)
        return {
            "source": rendered[0],
            "target": rendered[1],
            "retrieved": [(view, j == 0) for view, j in zip(rendered[2:], top)],
        }
