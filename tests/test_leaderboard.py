"""Leaderboards from hand-written records, and records written by many processes at once."""

import json
import math
import multiprocessing as mp
import shutil

import pandas as pd
import pytest

from benchmark import formats, spectrum
from benchmark import leaderboard as lb
from benchmark.records import read_records, write_record


def record(
    run_id,
    preset,
    task,
    seed,
    metrics,
    finished="2026-11-20T10:00:00+00:00",
    method=None,
    data="shapes",
    status="ok",
    epochs=5,
):
    return {
        "schema": 1,
        "run_id": run_id,
        "run_dir": f"/r/{run_id}",
        "status": status,
        "error": None,
        "method": method or preset.split("_")[0],
        "preset": preset,
        "task": task,
        "model": "vit_micro",
        "data": data,
        "seed": seed,
        "metrics": metrics,
        "checkpoint": {"path": None, "key": "target_encoder"},
        "started": finished,
        "finished": finished,
        "wall_seconds": 1.0,
        "config": {"pretrain": {"epochs": epochs}},
    }


@pytest.fixture
def results(tmp_path):
    """Two presets x 3 seeds: linear top1, mrr, predictor_ft top1; plus noise the board must ignore."""
    linear = {"iwm_inv_cpu": [80.0, 82.0, 84.0], "iwm_equi_cpu": [70.0, 71.0, 75.0]}
    mrr = {"iwm_inv_cpu": [0.1, 0.2, 0.3], "iwm_equi_cpu": [0.7, 0.8, 0.9]}
    pft = {"iwm_inv_cpu": [60.0, 61.0, 62.0], "iwm_equi_cpu": [66.0, 68.0, 70.0]}
    for preset in linear:
        for seed in range(3):
            run = f"{preset}-s{seed}"
            write_record(
                tmp_path / "a" / run,
                record(run, preset, "linear", seed, {"top1": linear[preset][seed], "chance_top1": 16.7}),
            )
            write_record(tmp_path / "b" / run, record(run, preset, "mrr", seed, {"mrr": mrr[preset][seed]}))
            write_record(tmp_path / "b" / run, record(run, preset, "predictor_ft", seed, {"top1": pft[preset][seed]}))
            write_record(tmp_path / "a" / run, record(run, preset, "pretrain", seed, {"final_loss": 0.5}))
    write_record(tmp_path / "a" / "broken", record("broken", "ijepa", "linear", 0, {}, status="failed"))
    write_record(
        tmp_path / "a" / "old",
        record("old", "ijepa", "linear", 0, {"top1": 99.0}, finished="2025-01-01T00:00:00+00:00"),
    )
    return tmp_path


def test_board_numbers_std_and_best(results):
    frame = lb.load_frame([results / "a", results / "b"], since="2026-01-01")
    b = lb.board(frame)
    inv = ("iwm", "iwm_inv_cpu", "vit_micro", "shapes")
    equi = ("iwm", "iwm_equi_cpu", "vit_micro", "shapes")
    assert b.mean.at[inv, ("linear", "top1")] == pytest.approx(82.0)
    assert b.std.at[inv, ("linear", "top1")] == pytest.approx(2.0)  # sample std of 80, 82, 84
    assert b.std.at[equi, ("linear", "top1")] == pytest.approx(math.sqrt(7.0))  # 70, 71, 75
    assert b.n.at[equi, ("mrr", "mrr")] == 3
    assert set(b.mean.columns) == {("linear", "top1"), ("mrr", "mrr"), ("predictor_ft", "top1")}
    assert ("ijepa", "ijepa", "vit_micro", "shapes") not in b.mean.index  # failed and too old
    best = b.best()
    assert best[("linear", "top1")] == {inv} and best[("mrr", "mrr")] == {equi}


def test_all_four_formats_highlight_the_best(results, tmp_path):
    b = lb.board(lb.load_frame([results], since="2026-01-01"))
    paths = formats.write_tables(b, tmp_path / "out")
    assert sorted(p.suffix for p in paths) == [".csv", ".html", ".md", ".tex"]
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    # 3 seeds: mean [mean -+ t(0.975, 2) * sd / sqrt(3)]; 80, 82, 84 -> 82 +- 4.97.
    # Bold only where the best is distinguishable from the runner-up (here: intervals over seeds
    # that do not overlap, the records holding no per-example evidence); ≈ where it is not.
    assert "| iwm / iwm_inv_cpu / vit_micro / shapes | 82.0 [77.0, 87.0] ≈ | 0.200 [-0.048, 0.448] | " in md
    assert "| iwm / iwm_equi_cpu / vit_micro / shapes | 72.0 [65.4, 78.6] ≈ | **0.800 [0.552, 1.048]** | " in md
    assert "68.0 [63.0, 73.0] ≈ | 3 |" in md and "Bold: best, and distinguishable" in md
    tex = (tmp_path / "out" / "leaderboard.tex").read_text()
    assert r"\textbf{0.800 [0.552, 1.048]}" in tex and r"iwm\_inv\_cpu" in tex and r"\bottomrule" in tex
    html = (tmp_path / "out" / "leaderboard.html").read_text()
    assert html.startswith("<!doctype html>") and "<title>Leaderboard</title>" in html and "<caption>" in html
    assert '<td class="best">0.800 [0.552, 1.048]</td>' in html and '<td class="">0.200 [-0.048, 0.448]</td>' in html
    csv = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    row = csv[csv["preset"] == "iwm_equi_cpu"].iloc[0]
    assert row["linear/top1/mean"] == pytest.approx(72.0) and row["linear/top1/n"] == 3
    assert row["predictor_ft/top1/std"] == pytest.approx(2.0)


def test_filters_and_split_by_config(results):
    frame = lb.load_frame([results], methods=["iwm_inv_cpu"], tasks=["linear", "pretrain"])
    assert set(frame["preset"]) == {"iwm_inv_cpu"} and set(frame["task"]) == {"linear", "pretrain"}
    assert lb.load_frame([results], datasets=["imagenet"]).empty
    assert set(lb.load_frame([results], until="2025-06-01")["run_id"]) == {"old"}
    lowest = lb.board(lb.load_frame([results], tasks=["pretrain"])).best()[("pretrain", "final_loss")]
    assert len(lowest) == 2  # a tie: both rows are best
    by = lb.board(lb.load_frame([results], tasks=["linear"], by=["pretrain.epochs"]), by=["pretrain.epochs"])
    assert by.mean.index.names[-1] == "pretrain.epochs"
    everything = lb.load_frame([results], tasks=["linear"], all_metrics=True)
    assert set(everything["metric"]) == {"top1", "chance_top1"}


def test_spectrum_plot_and_correlations(results, tmp_path):
    frame = lb.load_frame([results], since="2026-01-01")
    points = spectrum.spectrum_points(frame)
    assert len(points) == 6
    corr = spectrum.spectrum_plot(points, tmp_path / "spectrum.png")
    mrr = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    lin = [80.0, 82.0, 84.0, 70.0, 71.0, 75.0]
    expected = pd.Series(mrr).corr(pd.Series(lin))
    assert corr["linear top1"] == pytest.approx(expected) and corr["linear top1"] < 0
    assert corr["predictor_ft top1"] > 0.9
    assert (tmp_path / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_method_without_a_world_model_is_a_reference_band_on_the_spectrum(results, tmp_path):
    """DINO has linear-probe records and no MRR: not a point (no x), a band on the linear panel;
    the correlations stay those of the runs with MRR."""
    for seed, top1 in enumerate([90.0, 91.0, 92.0]):
        write_record(results / "a" / f"dino-s{seed}", record(f"dino-s{seed}", "dino", "linear", seed, {"top1": top1}))
    frame = lb.load_frame([results], since="2026-01-01")
    points, references = spectrum.spectrum_points(frame), spectrum.spectrum_references(frame)
    assert len(points) == 6 and "dino" not in points.index.get_level_values("preset")
    assert list(references.index.get_level_values("preset")) == ["dino"] * 3
    assert references[("linear", "top1")].tolist() == [90.0, 91.0, 92.0]
    assert ("predictor_ft", "top1") not in references.columns or references[("predictor_ft", "top1")].isna().all()
    without = spectrum.spectrum_plot(points, tmp_path / "without.png")
    with_band = spectrum.spectrum_plot(points, tmp_path / "with.png", references)
    assert with_band == without
    assert (tmp_path / "with.png").read_bytes() != (tmp_path / "without.png").read_bytes()


def test_headline_mapping():
    assert lb.headline_metric("mrr") == "mrr" and lb.headline_metric("ade20k") == "miou"
    assert lb.headline_metric("linear") == "top1" and lb.headline_metric("predictor_ft") == "top1"
    assert lb.headline(record("r", "ijepa", "ade20k", 0, {"miou": 41.5})) == ("miou", 41.5)


def test_leaderboard_cli(bench, results, tmp_path):
    proc = bench(
        "leaderboard",
        str(results / "a"),
        str(results / "b"),
        "--since",
        "2026-01-01",
        "--out",
        str(tmp_path / "cli"),
        check=0,
    )
    assert "correlation of mrr with linear top1: -0.8" in proc.stdout
    assert (tmp_path / "cli" / "spectrum.png").is_file() and (tmp_path / "cli" / "leaderboard.md").is_file()
    bad = bench("leaderboard", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "results folder not found" in bad.stderr
    none = bench("leaderboard", str(results), "--method", "mae")
    assert none.returncode == 2 and "no successful records match" in none.stderr


def _writer(args):
    folder, worker = args
    for i in range(50):
        rec = record(
            f"w{worker}-{i}",
            "ijepa",
            "linear",
            i,
            {"top1": float(worker * 100 + i)},
            finished=f"2026-11-20T10:{worker:02d}:{i:02d}+00:00",
        )
        rec["config"] = {"padding": "x" * 20000}  # large enough that a torn write would show
        write_record(f"{folder}/w{worker}-{i}", rec)
    return worker


def test_records_written_by_8_processes_all_land_intact(tmp_path):
    ctx = mp.get_context("fork")  # separate processes, without re-importing torch in each
    with ctx.Pool(8) as pool:
        pending = pool.map_async(_writer, [(str(tmp_path), w) for w in range(8)])
        seen = 0
        while not pending.ready():  # read while they write: never a torn or half record
            problems = []
            seen = max(seen, len(read_records(tmp_path, problems=problems)))
            assert problems == []
        assert sorted(pending.get()) == list(range(8))
    records = read_records(tmp_path)
    assert len(records) == 400
    assert sorted(r["metrics"]["top1"] for r in records) == sorted(
        float(w * 100 + i) for w in range(8) for i in range(50)
    )
    assert not list(tmp_path.rglob("*.tmp"))


def test_reading_passes_over_foreign_files(tmp_path):
    write_record(tmp_path / "good", record("good", "ijepa", "linear", 0, {"top1": 1.0}))
    (tmp_path / "bad" / "records").mkdir(parents=True)
    (tmp_path / "bad" / "records" / "linear.json").write_text("{not json")
    (tmp_path / "bad" / "records" / "other.json").write_text(json.dumps({"hello": 1}))
    problems = []
    assert [r["run_id"] for r in read_records(tmp_path, problems=problems)] == ["good"]
    assert len(problems) == 2 and any("unreadable" in p for p in problems)
    assert any("not a run record" in p for p in problems)


def _with_evidence(root, run, preset, correct):
    import numpy as np

    from benchmark.core.stats import Evidence, bootstrap_ci
    from benchmark.records import write_evidence

    evidence = Evidence("correct", {"correct": np.asarray(correct, dtype=bool)}, "val-set")
    rec = record(run, preset, "linear", 0, {"top1": evidence.metric(), "ci95": list(bootstrap_ci(evidence))})
    rec["run_dir"] = str(root / run)
    rec["examples"] = write_evidence(root / run, "linear", evidence)
    write_record(root / run, rec)


def test_best_is_bold_only_when_the_paired_test_separates_it(tmp_path):
    import numpy as np

    base = np.random.default_rng(0).random(2000) < 0.6
    better = base.copy()
    better[np.flatnonzero(~better)[:60]] = True  # 3 points more, on the same images
    _with_evidence(tmp_path / "clear", "a", "ijepa", better)
    _with_evidence(tmp_path / "clear", "b", "iwm", base)
    b = lb.board(lb.load_frame([tmp_path / "clear"]))
    column = ("linear", "top1")
    assert b.separated[column] and b.bold()[column] == {("ijepa", "ijepa", "vit_micro", "shapes")}
    assert b.low.at[("iwm", "iwm", "vit_micro", "shapes"), column] < 60.0  # one seed: the bootstrap interval
    # A one-image difference: the best is not told apart, both cells are marked.
    close = base.copy()
    close[np.flatnonzero(~close)[0]] = True
    _with_evidence(tmp_path / "close", "a", "ijepa", close)
    _with_evidence(tmp_path / "close", "b", "iwm", base)
    b = lb.board(lb.load_frame([tmp_path / "close"]))
    assert not b.separated[column] and b.bold() == {} and len(b.tied()[column]) == 2
    table = formats.to_markdown(b).split("\n\n")[0]  # the legend follows the table
    assert "**" not in table and table.count("≈") == 2


CHROMIUM = next((c for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here (.ci/run installs it)")
def test_html_page_renders_in_a_real_browser(results, tmp_path):
    import subprocess

    from PIL import Image

    b = lb.board(lb.load_frame([results], since="2026-01-01"))
    formats.write_tables(b, tmp_path / "out", title="Leaderboard: test")
    shot = tmp_path / "page.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,500",
            (tmp_path / "out" / "leaderboard.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 500)
    colours = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    assert (232, 245, 233) in colours  # the style sheet applied: the best cell's background
    dark = sum(n for n, c in image.getcolors(maxcolors=1 << 20) if sum(c) < 150)
    assert dark > 2000  # text was drawn


def _evaluated(root, run, preset, correct, fingerprint, data):
    """A linear record with per-example evidence on the evaluation set `fingerprint`, run on the
    data configuration `data` (the config's data section)."""
    import numpy as np

    from benchmark.core.stats import Evidence, bootstrap_ci
    from benchmark.records import write_evidence

    evidence = Evidence("correct", {"correct": np.asarray(correct, dtype=bool)}, fingerprint)
    rec = record(run, preset, "linear", 0, {"top1": evidence.metric(), "ci95": list(bootstrap_ci(evidence))})
    rec["run_dir"], rec["config"]["data"] = str(root / run), data
    rec["data"] = data["name"]
    rec["examples"] = write_evidence(root / run, "linear", evidence)
    write_record(root / run, rec)


BUILTIN = {"name": "shapes", "kind": "builtin", "version": 4, "image_size": 64, "label": "colour"}


def test_runs_on_different_evaluation_sets_are_never_ranked_or_marked_together(bench, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    # A task=all-sized val set and a 48-image one: the same task, not comparable.
    _evaluated(
        tmp_path, "big", "iwm", rng.random(1000) < 0.75, "val-1000", {**BUILTIN, "num_train": 4000, "num_val": 1000}
    )
    _evaluated(tmp_path, "small", "iwm", rng.random(48) < 0.27, "val-48", {**BUILTIN, "num_train": 96, "num_val": 48})
    # Two image folders with other roots and classes: two rows, never one.
    for name, n in (("pets", 200), ("birds", 300)):
        folder = {"name": "folder", "kind": "folder", "root": f"/data/{name}", "image_size": 64}
        _evaluated(tmp_path, name, "ijepa", rng.random(n) < 0.5, f"val-{name}", folder)
    b = lb.board(lb.load_frame([tmp_path]))
    assert len(b.mean.index) == 4 and b.n.max().max() == 1  # no record replaced another
    data = sorted(idx[3] for idx in b.mean.index)
    assert data == [
        "folder /data/birds 64px",
        "folder /data/pets 64px",
        "shapes v4 64px 4000/1000 colour",
        "shapes v4 64px 96/48 colour",
    ]
    columns = [c for c, _ in b.mean.columns]
    assert len(columns) == 4 and all(c.startswith("linear [") for c in columns)
    for column in b.mean.columns:  # one number per evaluation set: nothing ranked, nothing marked
        assert b.mean[column].notna().sum() == 1 and column not in b.tied() and column not in b.bold()
    text = formats.to_markdown(b)
    assert "≈" not in text.split("\n\n")[0] and "never ranked or paired together" in text
    proc = bench("leaderboard", str(tmp_path), "--out", str(tmp_path / "lb"), check=0)
    assert "linear [shapes v4 64px 96/48 colour]" in proc.stdout  # piped: full headers, not cut
    body = proc.stdout.split("┡")[1].split("└")[0]
    assert "never ranked or paired together" in proc.stdout and "≈" not in body and len(body.splitlines()) == 5


def test_one_precision_per_metric_in_every_table(results):
    from benchmark.tables import _headline, interval, number

    rec = record("r", "iwm", "linear", 0, {"top1": 93.0, "ci95": [91.4, 94.5]})
    assert _headline(rec) == "top1 93.0 [91.4, 94.5]"
    rec = record("r", "iwm", "multitask", 0, {"top1": 54.3, "ci95": [52.05, 56.4512]})
    assert _headline(rec).count(".") == 3 and all(
        len(p.split(".")[1].rstrip("],")) == 1 for p in _headline(rec).split()[1:]
    )
    assert interval(0.0412, 0.02, 0.06, "mrr") == "0.041 [0.020, 0.060]"
    assert number(-6.9, "top1", signed=True) == "-6.9" and number(8.333, "top1") == "8.3"


def test_correlations_only_when_defined_and_the_page_embeds_its_figure(bench, tmp_path):
    one = tmp_path / "one"
    write_record(one / "r", record("r", "iwm_equi_cpu", "mrr", 0, {"mrr": 0.2}))
    write_record(one / "r", record("r", "iwm_equi_cpu", "linear", 0, {"top1": 70.0}))
    proc = bench("leaderboard", str(one), "--out", str(tmp_path / "lb1"), check=0)
    assert "correlation of" not in proc.stdout and "nan" not in proc.stdout.replace(str(tmp_path), "")
    page = (tmp_path / "lb1" / "leaderboard.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1 and "spectrum.png" in page


def test_seed_dependent_evaluation_draws_stay_one_column_but_other_settings_split(tmp_path):
    """MRR draws its crops and banks from the seed, so its fingerprint changes across seeds on the
    same evaluation: three seeds are one column. Two settings on the same seed are two columns."""
    import numpy as np

    rng = np.random.default_rng(1)
    data = {**BUILTIN, "num_train": 4000, "num_val": 1000}
    for seed in range(3):
        _evaluated(tmp_path / "a", f"iwm-s{seed}", "iwm", rng.random(200) < 0.7, f"draws-{seed}", data)
        _evaluated(tmp_path / "a", f"ijepa-s{seed}", "ijepa", rng.random(200) < 0.6, f"draws-{seed}", data)
    for p in (tmp_path / "a").rglob("linear.json"):  # seed the records as their names say
        rec = json.loads(p.read_text())
        rec["seed"] = int(rec["run_id"][-1])
        p.write_text(json.dumps(rec))
    b = lb.board(lb.load_frame([tmp_path / "a"]))
    assert list(b.mean.columns) == [("linear", "top1")] and b.split == [] and b.n.max().max() == 3
    # The same seed evaluated on two sets (say another num_images): one column each, tagged.
    _evaluated(tmp_path / "a", "iwm-other-s0", "iwm_uncond_cpu", rng.random(100) < 0.5, "draws-other", data)
    b = lb.board(lb.load_frame([tmp_path / "a"]))
    assert b.split == ["linear"] and len(b.mean.columns) == 4
    assert all(c.startswith("linear [shapes v4 64px 4000/1000 colour ") for c, _ in b.mean.columns)
