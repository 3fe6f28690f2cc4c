"""Weighted k-NN classification on frozen features: DINO's protocol (eval_knn.py).

Features are the frozen eval encoder's pooled tokens of the centre crops (the run's shared
feature cache, the same the linear probe reads), L2-normalised. Each val image takes the k train
images of highest cosine similarity; each neighbour votes for its label with weight
exp(similarity / T); the classes are ranked by their summed votes. Every k of `ks` is evaluated in
one pass over the val images (the neighbours of the largest k hold those of every smaller one).
The headline is top-1 at `k` (DINO reports k = 20, T = 0.07). tests/test_knn.py checks the
classifier against the official function on fixed features.
"""

from __future__ import annotations

import torch

from benchmark.core.errors import ConfigError
from benchmark.core.stats import Evidence
from tasks.base import POOLS, Choice, Number, Numbers, Task, TaskContext

# Val images per block of the similarity matrix: bounds its memory to CHUNK x train images.
CHUNK = 1024


def knn_rankings(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    ks: list[int],
    temperature: float,
    num_classes: int,
) -> dict[int, torch.Tensor]:
    """For every k: the classes of each test row ranked by weighted vote, [N_test, num_classes]
    (best first). Features are L2-normalised here; ties between classes are broken by torch's
    descending sort, as the official classifier's are."""
    train = torch.nn.functional.normalize(train.float(), dim=1, p=2)
    test = torch.nn.functional.normalize(test.float(), dim=1, p=2)
    largest = max(ks)
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test), CHUNK):
        similarity = test[start : start + CHUNK] @ train.T
        weights, neighbours = similarity.topk(largest, dim=1, largest=True, sorted=True)
        votes_of = train_labels[neighbours]  # [chunk, largest]
        weights = (weights / temperature).exp()
        for k in ks:
            votes = torch.zeros(len(votes_of), num_classes)
            votes.scatter_add_(1, votes_of[:, :k], weights[:, :k])
            out[k].append(votes.sort(dim=1, descending=True).indices)
    return {k: torch.cat(parts) for k, parts in out.items()}


class KNNClassifier(Task):
    """Weighted k-NN (DINO's eval_knn.py) on the frozen encoder's pooled features."""

    name = "knn"
    settings = {
        "ks": Numbers(Number(1, integer=True)),
        "k": Number(1, integer=True),
        "temperature": Number(0, low_open=True),
        "pool": Choice(POOLS),
    }

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        if self.cfg["k"] not in self.cfg["ks"]:
            raise ConfigError(f"tasks.knn.k={self.cfg['k']} (the headline) must be one of ks={self.cfg['ks']}")

    def pool(self, method) -> str:
        return method.probe_pool if self.cfg["pool"] == "method" else self.cfg["pool"]

    def check(self, method) -> None:
        if self.pool(method) not in method.probe_pools:
            raise ConfigError(
                f"tasks.knn.pool={self.cfg['pool']}: method {method.name} has no {self.pool(method)} feature "
                f"(it offers {', '.join(method.probe_pools)})"
            )

    def check_data(self, source, sizes: dict[str, int]) -> None:
        # Larger ks than there are train images are left out of the record (and listed there);
        # the headline's k must fit.
        if self.cfg["k"] > sizes["train"]:
            raise ConfigError(
                f"tasks.knn.k={self.cfg['k']} is more than the {sizes['train']} train images that can be neighbours"
            )

    def run(self, method, ctx: TaskContext) -> dict:
        cfg = self.cfg
        pool = self.pool(method)
        x_train, y_train = ctx.pooled_features(method, "train", pool)
        x_val, y_val = ctx.pooled_features(method, "val", pool)
        num_classes = int(max(y_train.max(), y_val.max())) + 1
        ks = sorted({k for k in cfg["ks"] if k <= len(x_train)})
        skipped = sorted({k for k in cfg["ks"] if k > len(x_train)})
        rankings = knn_rankings(x_train, y_train, x_val, ks, cfg["temperature"], num_classes)
        per_k = {}
        for k in ks:
            hits = rankings[k] == y_val.view(-1, 1)
            per_k[str(k)] = {
                "top1": 100.0 * hits[:, 0].sum().item() / len(hits),
                # As the official: the first min(5, k) ranked classes (the rest have no votes).
                "top5": 100.0 * hits[:, : min(5, k)].any(dim=1).sum().item() / len(hits),
            }
        correct = (rankings[cfg["k"]][:, 0] == y_val).numpy()
        return {
            "evidence": Evidence("correct", {"correct": correct}, ctx.val_fingerprint()),
            "top1": per_k[str(cfg["k"])]["top1"],
            "top5": per_k[str(cfg["k"])]["top5"],
            "k": cfg["k"],
            "temperature": cfg["temperature"],
            "pool": pool,
            "per_k": per_k,
            # ks with more neighbours than train images: not evaluated.
            "ks_skipped": skipped,
            "chance_top1": 100.0 / num_classes,
            "num_classes": num_classes,
            "feature_dim": int(x_train.size(1)),
            "train_samples": len(x_train),
            "val_samples": len(x_val),
        }
