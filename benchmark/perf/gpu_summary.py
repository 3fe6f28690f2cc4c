"""The figures of a `scripts/gpu_check.sh` run side by side, from the JSONs its parts wrote.

    python -m benchmark.perf.gpu_summary OUT_DIR

Per method: the data path (images/s per core, against the official pipeline, through the loader
with the node's cores, the cores one GPU needs) and the ViT-B/16 step on the GPU (s/step, img/s,
peak memory, share of the bf16 matmul ceiling, model FLOP utilisation), plain, default and
compiled. The compiled step's losses are checked against the default step's: same batches and
initial weights, timed in another process. Parts that did not run leave their cells empty.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _case(result: dict | None, method: str, variant: str) -> dict | None:
    cases = (result or {}).get("cases", [])
    return next((c for c in cases if c["method"] == method and c["variant"] == variant), None)


def summary(out: Path) -> dict:
    data = _load(out / "data_path.json") or {}
    step = _load(out / "perf_gpu.json")
    rows = {}
    for p in data.get("pipelines", []):
        if p["side"] == "ours":
            pair = data["pairs"].get(p["preset"], {})
            gpu = data.get("gpu", {}).get(p["preset"], {})
            rows[p["preset"]] = {
                "images_per_s_per_core": p["median_images_per_s"],
                "vs_official": pair.get("ratio"),
                "images_per_s_all_workers": p.get("workers_images_per_s"),
                "gflop_per_image": gpu.get("gflop_per_image"),
                "cores_needed": gpu.get("cores_needed"),
            }
    methods = list(rows) or [c["method"] for c in (step or {}).get("cases", []) if c["variant"] == "fast"]
    for method in methods:
        row = rows.setdefault(method, {})
        compiled_run = _load(out / f"perf_compiled_{method}.json")
        for variant, result in (("eager", step), ("fast", step), ("compiled", compiled_run)):
            case = _case(result, method, variant)
            if case is not None:
                row[variant] = {
                    k: case.get(k) for k in ("s_per_step", "images_per_s", "peak_memory_mib", "ceiling_fraction", "mfu")
                }
                row[variant]["equal_numerics"] = case.get("equal_numerics")
        fast, compiled = _case(step, method, "fast"), _case(compiled_run, method, "compiled")
        if fast and compiled:
            diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(compiled["losses"], fast["losses"]))
            row["compiled"]["loss_rel_diff_vs_fast"] = diff
            row["compiled"]["equal_numerics"] = diff <= compiled_run["loss_rtol"][compiled["precision"]]
            row["compiled"]["speedup"] = fast["s_per_step"] / compiled["s_per_step"]
    return {
        "cores": data.get("cpus"),
        "workers": data.get("workers"),
        "peak_tflops": data.get("peak_tflops"),
        "mfu": data.get("mfu"),
        "methods": rows,
    }


def table(result: dict):
    from rich.table import Table

    def num(value, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    def pct(value) -> str:
        return "" if value is None else f"{100 * value:.0f}%"

    t = Table(
        title=f"gpu_check: data path on {result['cores']} cores ({result['workers']} loader worker(s)); "
        "ViT-B/16 bf16 step, eager / fast / compiled"
    )
    columns = [
        "method",
        "img/s per core",
        "vs official",
        "img/s all workers",
        "GFLOP/img",
        "cores per GPU",
        "s/step e / f / c",
        "img/s fast",
        "peak GiB fast",
        "of bf16 ceiling",
        "MFU fast",
        "compile speed-up",
        "losses equal",
    ]
    for col in columns:
        t.add_column(col, justify="left" if col == "method" else "right")
    for method, r in result["methods"].items():
        e, f, c = (r.get(v) or {} for v in ("eager", "fast", "compiled"))
        checks = [
            f"{name} {'yes' if v['equal_numerics'] else 'NO'}"
            for name, v in (("fast", f), ("compiled", c))
            if v.get("equal_numerics") is not None
        ]
        t.add_row(
            method,
            num(r.get("images_per_s_per_core"), ".1f"),
            num(r.get("vs_official"), ".2f"),
            num(r.get("images_per_s_all_workers"), ".0f"),
            num(r.get("gflop_per_image"), ".1f"),
            num(r.get("cores_needed"), ".1f"),
            " / ".join(num(v.get("s_per_step"), ".3f") or "-" for v in (e, f, c)),
            num(f.get("images_per_s"), ".0f"),
            num(f["peak_memory_mib"] / 1024 if f.get("peak_memory_mib") is not None else None, ".1f"),
            pct(f.get("ceiling_fraction")),
            pct(f.get("mfu")),
            num(c.get("speedup"), ".2f"),
            ", ".join(checks),
        )
    return t


def main(argv: list[str]) -> int:
    from benchmark.tables import print_wide

    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m benchmark.perf.gpu_summary OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    result = summary(out)
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print_wide(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
