"""The whole point of the harness at small scale: pretraining must produce a better encoder."""

import json

import pytest


def top1(tmp_path, run):
    return json.loads((tmp_path / "results" / run / "records/linear.json").read_text())["metrics"]


@pytest.mark.slow
def test_pretraining_beats_the_random_encoder_and_trains_the_world_model(bench, tmp_path):
    # The default CPU presets on the default built-in data, as a user runs them.
    bench("run", "method=ijepa", "task=linear", "run_dir=results/ijepa", "progress=false", check=0)
    bench("run", "method=iwm", "task=linear", "run_dir=results/iwm", "progress=false", check=0)
    # 0 epochs: the same encoder initialisation (same seed), untrained.
    bench(
        "run", "method=ijepa", "task=linear", "pretrain.epochs=0", "run_dir=results/random", "progress=false", check=0
    )
    ijepa, iwm, random = (top1(tmp_path, r) for r in ("ijepa", "iwm", "random"))
    assert ijepa["top1"] > ijepa["chance_top1"] + 40
    assert ijepa["top1"] > random["top1"] + 10, (ijepa["top1"], random["top1"])
    # The equivariant IWM preset keeps colour out of its encoder's linear features (its linear
    # probe on the colour label is at the random encoder's level, docs/results.md); what its
    # pretraining must produce is a world model that applies the transformation: MRR above chance.
    assert iwm["top1"] > iwm["chance_top1"] + 40
    bench(
        "run",
        "method=iwm",
        "checkpoint=results/iwm/checkpoints/last.pt",
        "task=mrr",
        "run_dir=results/iwm_mrr",
        "progress=false",
        check=0,
    )
    mrr = json.loads((tmp_path / "results/iwm_mrr/records/mrr.json").read_text())
    assert mrr["metrics"]["ci95"][0] > mrr["metrics"]["chance_mrr"], mrr["metrics"]
