"""The whole point of the harness at small scale: pretraining must produce a better encoder."""
import json

import pytest


@pytest.mark.slow
def test_linear_probe_after_pretraining_beats_the_random_encoder(bench, tmp_path):
    # The default CPU preset on the default built-in data, as `bench run` would run it.
    bench("run", "task=linear", "run_dir=results/trained", "progress=false", check=0)
    bench("run", "task=linear", "pretrain.epochs=0", "run_dir=results/random", "progress=false", check=0)
    trained = json.loads((tmp_path / "results/trained/records/linear.json").read_text())["metrics"]
    random = json.loads((tmp_path / "results/random/records/linear.json").read_text())["metrics"]
    assert trained["top1"] > trained["chance_top1"] + 40
    assert trained["top1"] > random["top1"] + 10, (trained["top1"], random["top1"])
