"""The weighted k-NN task: equal to DINO's official classifier on fixed features, and through
`bench run` on the built-in data with its evidence and interval."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY

from tasks.knn import knn_rankings

TINY_RUN = [o for o in TINY if not o.startswith("tasks.")]

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "dino_knn.pt"


def test_equal_to_the_official_knn_classifier_for_every_k_in_one_pass():
    f = torch.load(FIXTURE)
    ks = sorted(f["official"])
    # The fixture's features are unit vectors; scale them to show the task normalises its own.
    rankings = knn_rankings(
        3.0 * f["train_features"], f["train_labels"], 0.5 * f["test_features"], ks, f["temperature"], f["num_classes"]
    )
    for k in ks:
        hits = rankings[k] == f["test_labels"].view(-1, 1)
        top1 = 100.0 * hits[:, 0].sum().item() / len(hits)
        top5 = 100.0 * hits[:, : min(5, k)].any(dim=1).sum().item() / len(hits)
        assert (top1, top5) == pytest.approx(f["official"][k], abs=1e-9), k
    # More neighbours change the answer here: the test would catch a k that is ignored.
    assert len({f["official"][k][0] for k in ks}) > 2


def test_votes_by_hand():
    """Two classes; the nearest neighbour is class 1 but three farther class-0 votes outweigh it at
    a high temperature, not at a low one."""
    train = torch.tensor([[1.0, 0.0], [0.9, 0.44], [0.8, 0.6], [0.7, 0.71]])
    labels = torch.tensor([1, 0, 0, 0])
    test = torch.tensor([[1.0, 0.0]])
    assert knn_rankings(train, labels, test, [1, 4], 1.0, 2)[1][0, 0] == 1
    assert knn_rankings(train, labels, test, [1, 4], 1.0, 2)[4][0, 0] == 0
    assert knn_rankings(train, labels, test, [4], 0.05, 2)[4][0, 0] == 1


def test_bench_run_task_knn_records_every_k_with_its_evidence(bench, tmp_path):
    proc = bench("run", "method=ijepa", "task=knn", "run_dir=results/k", *TINY_RUN, check=0)
    rec = json.loads((tmp_path / "results/k/records/knn.json").read_text())
    m = rec["metrics"]
    assert rec["status"] == "ok" and m["k"] == 20 and m["temperature"] == 0.07
    assert set(m["per_k"]) == {"10", "20"} and m["ks_skipped"] == [100, 200]  # 96 train images
    assert m["top1"] == m["per_k"]["20"]["top1"] and m["top1"] <= m["top5"] <= 100
    assert m["ci95"][0] <= m["top1"] <= m["ci95"][1] and rec["examples"]["n"] == 48
    assert "knn" in proc.stdout
    bad = bench("run", "method=ijepa", "task=knn", "tasks.knn.k=5", *TINY_RUN)
    assert bad.returncode == 2 and "tasks.knn.k=5 (the headline) must be one of ks" in bad.stderr
    bad = bench("run", "method=ijepa", "task=knn", "tasks.knn.k=200", "tasks.knn.ks=[200]", *TINY_RUN)
    assert bad.returncode == 2 and "tasks.knn.k=200 is more than the 96 train images" in bad.stderr
