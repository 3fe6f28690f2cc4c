"""`bench run task=all` with every adapter, as a user runs it, and bad task settings."""

import json

import pytest
from conftest import TINY, TINY_MODEL

ADAPTERS = ["attentive", "predictor_ft", "predictor_ft_random", "encoder_ft", "end_to_end", "multitask"]
SHORT = [f"tasks.{t}.{k}={v}" for t in ADAPTERS for k, v in (("epochs", 1), ("batch_size", 16))] + [
    "tasks.mrr.bank_size=16",
    "tasks.mrr.num_images=8",
    "tasks.ade20k.iters=10",
    "tasks.ade20k.backend=native",
]


@pytest.mark.slow
def test_task_all_runs_every_adapter_and_prints_the_paper_table(bench, tmp_path):
    proc = bench("run", "method=iwm", "task=all", "run_dir=results/all", *TINY, *SHORT, check=0)
    records = {
        t: json.loads((tmp_path / f"results/all/records/{t}.json").read_text())
        for t in ["linear", "knn", *ADAPTERS, "mrr", "ade20k"]
    }
    assert all(r["status"] == "ok" for r in records.values())
    assert 0 < records["mrr"]["metrics"]["mrr"] <= 1 and 0 <= records["ade20k"]["metrics"]["miou"] <= 100
    for task in ADAPTERS:
        m = records[task]["metrics"]
        assert 0 <= m["top1"] <= 100 and m["trainable_params"] > 0 and m["train_seconds"] > 0
    assert records["predictor_ft"]["metrics"]["predictor"] == "pretrained"
    assert records["predictor_ft_random"]["metrics"]["predictor"] == "random"
    # One row per method, one column per task, headline top-1 in the cells.
    table = proc.stdout[proc.stdout.index("results (top-1 %") :]
    row = next(line for line in table.splitlines() if "iwm" in line)
    for task in ["linear", "knn", *ADAPTERS]:
        assert task[:6] in table
        assert f"{records[task]['metrics']['top1']:.1f}" in row
    # MRR and segmentation mIoU get their own columns, in their own units.
    assert "ade20k mIoU" in table and f"{records['ade20k']['metrics']['miou']:.1f}" in row
    assert f"{records['mrr']['metrics']['mrr']:.3f}" in row


@pytest.mark.parametrize(
    "args, message",
    [
        (["tasks.encoder_ft.head=mlp"], "tasks.encoder_ft.head must be one of attentive, pooled"),
        (["tasks.predictor_ft.label_smoothing=2"], "tasks.predictor_ft.label_smoothing must be in [0, 1]"),
        (["tasks.end_to_end.layer_decay=1.5"], "tasks.end_to_end.layer_decay must be in (0, 1] or null"),
        (["tasks.attentive.lr=fast"], "tasks.attentive.lr must be a number"),
        (["token_cache_gb=-1"], "token_cache_gb must be >= 0"),
    ],
)
def test_bad_task_settings_exit_2_before_any_compute(bench, tmp_path, args, message):
    proc = bench("run", "method=iwm", "task=all", *TINY_MODEL, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


# The tiny settings without task keys (a `tasks.linear.*` override needs the linear task selected).
NO_TASK = [o for o in TINY if not o.startswith("tasks.")]


def test_a_named_task_that_does_not_apply_is_an_error_before_compute(bench, tmp_path):
    proc = bench("run", "method=mae", "task=mrr", "run_dir=results/m", *NO_TASK)
    assert proc.returncode == 2 and not (tmp_path / "results/m").exists()
    assert "task mrr does not apply: method mae: it has no target encoder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_task_set_skips_what_does_not_apply_and_says_why(tmp_path, monkeypatch):
    from benchmark.config import load_config
    from benchmark.runner import plan_run

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    plan = plan_run(load_config(["method=mae", "task=all", f"results_dir={tmp_path}", *TINY]))
    assert plan.skipped == {"mrr": "method mae: it has no target encoder and no masks"}
    assert plan.task_names == ["linear", "knn", *ADAPTERS, "ade20k"]
    plan = plan_run(load_config(["method=iwm", "task=all", f"results_dir={tmp_path}", *TINY]))
    assert plan.skipped == {} and "mrr" in plan.task_names


# A paper preset is for the paper's 224 px; at the built-in 64 px its encoder's patches may not fit.
PAPER_PRESETS = {"ijepa_vith14", "iwm_inv_12_384", "iwm_equi_18_384", "iwm_equi_36_512", "mae_paper", "dino_vits16"}
# Methods without a predictor: task=all skips the predictor tasks and MRR, saying why.
NO_PREDICTOR = {"dino", "dino_vits16"}


def test_every_method_preset_passes_the_checks_of_task_all_with_its_defaults(tmp_path, monkeypatch):
    """No compute: each preset's own model and settings, every task of task=all checked."""
    from benchmark.config import group_options, load_config
    from benchmark.runner import plan_run

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    presets = group_options("method")
    assert PAPER_PRESETS < set(presets)
    for preset in presets:
        size = ["data.image_size=224"] if preset in PAPER_PRESETS else []
        plan = plan_run(load_config([f"method={preset}", "task=all", f"run_dir={tmp_path / preset}", *size]))
        assert plan.task_names[0] == "linear" and "ade20k" in plan.task_names, preset
        if preset in NO_PREDICTOR:
            assert {"knn", "attentive", "encoder_ft"} <= set(plan.task_names), preset
            predictor_tasks = {"predictor_ft", "predictor_ft_random", "end_to_end", "multitask", "mrr"}
            assert set(plan.skipped) == predictor_tasks and not predictor_tasks & set(plan.task_names), preset
            assert all("has no predictor" in why for why in plan.skipped.values()), plan.skipped
        else:
            assert "predictor_ft" in plan.task_names and "multitask" in plan.task_names, preset


def test_an_attentive_head_takes_the_heads_of_the_network_behind_its_tokens(tmp_path, monkeypatch):
    """head_heads=null: the encoder's heads over encoder tokens, MAE's decoder's over its
    predictions; a count that does not divide the width is refused naming the fix."""
    from omegaconf import OmegaConf

    from benchmark.config import load_config
    from benchmark.core.errors import ConfigError
    from benchmark.runner import plan_run
    from methods import build_method

    cfg = load_config(["method=mae", "task=all"])
    assert cfg.tasks.attentive.head_heads is None and cfg.tasks.predictor_ft.head_heads is None
    plain = OmegaConf.to_container
    method = build_method("mae", plain(cfg.model), plain(cfg.method), cfg.data.image_size)
    assert (method.token_heads, method.world_model_heads) == (cfg.model.num_heads, cfg.method.predictor.num_heads)
    assert method.world_model_dim % method.world_model_heads == 0
    for preset in ("ijepa", "iwm"):
        cfg = load_config([f"method={preset}"])
        method = build_method(cfg.method.name, plain(cfg.model), plain(cfg.method), cfg.data.image_size)
        assert method.world_model_heads == method.token_heads == cfg.model.num_heads
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    bad = ["method=mae", "task=predictor_ft", "tasks.predictor_ft.head_heads=12", f"run_dir={tmp_path}/r"]
    with pytest.raises(ConfigError, match=r"head_heads=12 does not divide the width 128 .*null takes the 4 heads"):
        plan_run(load_config(bad))


def test_task_none_pretrains_alone(bench, tmp_path):
    proc = bench("run", "method=ijepa", "task=none", "run_dir=results/p", *NO_TASK, check=0)
    assert sorted(p.name for p in (tmp_path / "results/p/records").iterdir()) == ["pretrain.json"]
    assert (tmp_path / "results/p/checkpoints/last.pt").is_file() and "pretrain" in proc.stdout
    again = bench(
        "run", "method=ijepa", "task=none", f"checkpoint={tmp_path / 'results/p/checkpoints/last.pt'}", *NO_TASK
    )
    assert again.returncode == 2 and "nothing to run" in again.stderr


def test_records_carry_intervals_and_bench_compare_pairs_them(bench, tmp_path):
    linear = [*NO_TASK, "task=linear", "tasks.linear.epochs=3"]
    bench("run", "method=ijepa", "run_dir=a", *linear, check=0)
    proc = bench("run", "method=iwm", "run_dir=b", *linear, check=0)
    record = json.loads((tmp_path / "a/records/linear.json").read_text())
    low, high = record["metrics"]["ci95"]
    assert low <= record["metrics"]["top1"] <= high and high - low > 0
    assert record["examples"]["kind"] == "correct" and record["examples"]["n"] == 48
    assert (tmp_path / "a/records/linear.examples.npz").is_file() and "[" in proc.stdout  # the CI in the summary

    same = bench("compare", "a", "a", check=0)
    assert "linear" in same.stdout and "+0.0" in same.stdout and "not distinguishable" in same.stdout
    both = bench("compare", "a", "b", check=0)
    assert "linear" in both.stdout and any(v in both.stdout for v in ("A better", "B better", "not distinguishable"))

    bench("run", "method=ijepa", "run_dir=c", *linear, "data.num_val=40", check=0)
    refused = bench("compare", "a", "c")
    assert refused.returncode == 2 and "refused linear: cannot pair runs evaluated on different val examples" in (
        refused.stderr
    )
    mixed = bench("compare", ".", "a")
    assert mixed.returncode == 2 and "several configurations" in mixed.stderr

    # Two tasks of the same runs, scored on the same val examples (the pretrained vs the random
    # predictor, in the claims): --tasks TASK_OF_A:TASK_OF_B.
    attentive = ["task=attentive", "tasks.attentive.epochs=1", "tasks.attentive.batch_size=16"]
    bench("run", "method=ijepa", "checkpoint=a/checkpoints/last.pt", "run_dir=a2", *NO_TASK, *attentive, check=0)
    cross = bench("compare", "a", "a2", "--tasks", "linear:attentive", check=0)
    assert "linear vs attentive" in cross.stdout and "refused" not in cross.stderr
    itself = bench("compare", "a", "a", "--tasks", "linear:linear", check=0)
    assert "+0.0" in itself.stdout and "not distinguishable" in itself.stdout
    absent = bench("compare", "a", "a", "--tasks", "linear:mrr")
    assert absent.returncode == 2 and "B has no records of task mrr" in absent.stderr
    malformed = bench("compare", "a", "a", "--tasks", "linear")
    assert malformed.returncode == 2 and "--tasks takes TASK_OF_A:TASK_OF_B" in malformed.stderr


def test_seeds_run_the_job_once_per_seed_and_summarise_over_them(bench, tmp_path):
    proc = bench("run", "method=ijepa", "seeds=2", "run_dir=results/s", *NO_TASK, "task=linear", check=0)
    values = []
    for seed in (0, 1):
        rec = json.loads((tmp_path / f"results/s/seed{seed}/records/linear.json").read_text())
        assert rec["seed"] == seed and rec["config"]["seeds"] is None
        values.append(rec["metrics"]["top1"])
    assert "mean [95% CI over seeds]" in proc.stdout and "linear top1" in proc.stdout
    assert f"0: {values[0]:.1f}, 1: {values[1]:.1f}" in proc.stdout
    bad = bench("run", "method=ijepa", "seeds=[1,1]", *NO_TASK)
    assert bad.returncode == 2 and "list of distinct seeds" in bad.stderr


def test_the_same_command_and_seed_give_identical_records(bench, tmp_path):
    args = [*NO_TASK, "task=attentive", "tasks.attentive.epochs=1", "tasks.attentive.batch_size=16"]
    for run in ("r1", "r2"):
        bench("run", "method=iwm", f"run_dir={run}", *args, check=0)
    for task in ("pretrain", "attentive"):
        a, b = (json.loads((tmp_path / run / "records" / f"{task}.json").read_text()) for run in ("r1", "r2"))
        timing = {"train_seconds", "images_per_second", "checkpoint"}
        same = {k: v for k, v in a["metrics"].items() if k not in timing}
        assert same == {k: v for k, v in b["metrics"].items() if k not in timing}, task
    evidence = [(tmp_path / run / "records/attentive.examples.npz").read_bytes() for run in ("r1", "r2")]
    assert evidence[0] == evidence[1]
    logs = [(tmp_path / run / "train_log.jsonl").read_text() for run in ("r1", "r2")]
    assert logs[0] == logs[1] and logs[0]


def test_a_task_gives_the_same_record_after_pretraining_in_process_as_from_the_checkpoint(bench, tmp_path):
    """Drop path draws from torch's global RNG, which pretraining has advanced: each task runs
    under its own seeded RNG, so `task=all` and a run from the saved checkpoint agree."""
    args = [*NO_TASK, "task=encoder_ft", "tasks.encoder_ft.epochs=1", "tasks.encoder_ft.batch_size=16"]
    bench("run", "method=iwm", "run_dir=inline", *args, check=0)
    bench("run", "method=iwm", "checkpoint=inline/checkpoints/last.pt", "run_dir=loaded", *args, check=0)
    a, b = (
        json.loads((tmp_path / run / "records/encoder_ft.json").read_text())["metrics"] for run in ("inline", "loaded")
    )
    assert a["first_loss"] == b["first_loss"] and a["loss_curve"] == b["loss_curve"] and a["top1"] == b["top1"]
    evidence = [(tmp_path / run / "records/encoder_ft.examples.npz").read_bytes() for run in ("inline", "loaded")]
    assert evidence[0] == evidence[1]


def test_the_cpu_presets_stability_settings_stay_out_of_the_paper_recipes():
    """The CPU schedule's halved peak lr and the CPU end-to-end preset's gradient clipping were
    chosen for seed stability on the built-in data; the paper presets keep the papers' values."""
    from benchmark.config import load_config

    cpu = load_config(["method=iwm", "task=all"])
    assert cpu.pretrain.lr == pytest.approx(5e-4) and cpu.tasks.end_to_end.clip_grad == 1.0
    paper = load_config(["method=iwm", "pretrain=paper", "task=paper"])
    assert paper.pretrain.lr == pytest.approx(1e-3)
    assert paper.tasks.end_to_end.clip_grad == 0.0 and paper.tasks.encoder_ft.clip_grad == 0.0
