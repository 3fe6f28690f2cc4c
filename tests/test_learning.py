"""The whole point of the harness at small scale: pretraining must produce a better encoder."""

import json

import pytest


def top1(tmp_path, run):
    return json.loads((tmp_path / "results" / run / "records/linear.json").read_text())["metrics"]


@pytest.mark.slow
def test_linear_probe_after_pretraining_beats_the_random_encoder(bench, tmp_path):
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
    assert iwm["top1"] > random["top1"] + 5, (iwm["top1"], random["top1"])
