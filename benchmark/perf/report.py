"""A case's figures from its timings, the fast-versus-eager loss check, and the printed tables."""

from __future__ import annotations

import statistics


def summarise(case: dict, ceiling: dict, peak_tflops: float | None) -> dict:
    seconds = statistics.median(case["seconds"])
    loop = statistics.median(case["loop_seconds"])
    gflop = statistics.mean(case["flops"]) / 1e9
    rate = sum(case["flops"]) / sum(case["seconds"]) / 1e9
    row = {
        "s_per_step": seconds,
        "loop_s_per_step": loop,
        "images_per_s": case["batch_size"] / seconds,
        "gflop_per_step": gflop,
        "gflops": rate,
        "ceiling_fraction": rate / ceiling[case["precision"]],
        "wait_s_per_step": statistics.median(case["waits"]),
        "max_wait_s": max(case["waits"]),
        "data_s_per_batch": case["data_seconds_per_batch"],
        "waits_for_data": max(case["waits"]) > 0.05 * loop,
    }
    if peak_tflops:
        row["mfu"] = rate / (peak_tflops * 1e3)
    return row


def check_numerics(cases: list[dict], rtol: dict) -> None:
    """Attach to every fast case the largest relative loss difference to its eager twin."""
    eager = {(c["method"], c["precision"]): c for c in cases if c["variant"] == "eager"}
    for c in cases:
        twin = eager.get((c["method"], c["precision"]))
        if c["variant"] == "eager" or twin is None:
            continue
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(c["losses"], twin["losses"]))
        c["loss_rel_diff_vs_eager"] = diff
        c["equal_numerics"] = diff <= rtol[c["precision"]]


def column_table(title: str, columns, left=()):
    """A rich table of these columns under this title: those in `left` left-justified, the others
    right-justified."""
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


def tables(result: dict):
    """The rich tables `bench perf` prints."""
    c = result["ceiling_gflops"]
    title = (
        f"training step on {result['device']}, {result['threads']} threads, median of "
        f"{result['steps']} x {result['rounds']} steps after {result['warmup']} warm-up (s/step: the step alone on "
        f"built batches, each seen once untimed first; rounds: the lowest and highest median of one round; "
        f"loop s/step: fed by the default "
        f"loader workers); matmul ceiling "
        f"{c['fp32']:.0f} GFLOP/s fp32, {c['bf16']:.0f} bf16"
    )
    columns = [
        "method",
        "precision",
        "variant",
        "s/step",
        "rounds",
        "img/s",
        "GFLOP/step",
        "GFLOP/s",
        "of ceiling",
        "peak MiB",
        "data s/batch",
        "loop s/step",
        "wait s",
        "losses vs eager",
    ]
    step = column_table(title, columns, left=("method", "precision", "variant"))
    for case in result["cases"]:
        check = (
            ""
            if "equal_numerics" not in case
            else f"{'equal' if case['equal_numerics'] else 'DIFFER'} ({case['loss_rel_diff_vs_eager']:.1e})"
        )
        lo, hi = min(case["round_medians_s"]), max(case["round_medians_s"])
        step.add_row(
            case["method"],
            case["precision"],
            case["variant"],
            f"{case['s_per_step']:.3f}",
            f"{lo:.3f}-{hi:.3f}" if len(case["round_medians_s"]) > 1 else "-",
            f"{case['images_per_s']:.1f}",
            f"{case['gflop_per_step']:.1f}",
            f"{case['gflops']:.0f}",
            f"{100 * case['ceiling_fraction']:.0f}%",
            f"{case['peak_memory_mib']:.0f}",
            f"{case['data_s_per_batch']:.3f}",
            f"{case['loop_s_per_step']:.3f}",
            f"{case['wait_s_per_step']:.3f}",
            check,
        )
    out = [step]
    probe = result.get("linear_probe")
    if probe:
        t = column_table(
            f"linear probe: {probe['heads']} heads, {probe['epochs']} epochs, "
            f"{probe['samples']} x {probe['feature_dim']} features",
            (
                "grid, one pass",
                "baseline: the same heads one at a time",
                "baseline s",
                "speed-up",
                "heads with |w diff| < 1e-4",
                "heads with equal top-1",
                "worst |w diff| (lr)",
            ),
        )
        t.caption = (
            f"pooled features: {probe['features_first_seconds']:.2f} s extracted, "
            f"{probe['features_cached_seconds']:.4f} s from the cache for every later probe"
        )

        def agreement(cmp):
            diffs, same = cmp["max_weight_diff"], cmp["same_train_top1"]
            worst = max(range(len(diffs)), key=diffs.__getitem__)
            return (
                f"{sum(d < 1e-4 for d in diffs)}/{len(diffs)}",
                f"{sum(same)}/{len(same)}",
                f"{diffs[worst]:.1e} ({probe['lrs'][worst]:g})",
            )

        for name, key, speedup, cmp in (
            ("same code, one head per call", "one_at_a_time_seconds", "speedup", "grid_vs_one_at_a_time"),
            ("nn.Linear + torch.optim.SGD", "torch_sgd_seconds", "speedup_vs_torch_sgd", "grid_vs_torch_sgd"),
        ):
            t.add_row(
                f"{probe['grid_seconds']:.2f} s",
                name,
                f"{probe[key]:.2f} s",
                f"{probe[speedup]:.1f}x",
                *agreement(probe[cmp]),
            )
        t.add_row("", "(the two baselines against each other)", "", "", *agreement(probe["one_at_a_time_vs_torch_sgd"]))
        out.append(t)
    stages = result.get("task_stages")
    if stages:
        t = column_table(
            "task stages: training step (real adapter and loop), attention kernel fused SDPA vs the "
            "default auto (math under bf16 on CPU); median of 3 interleaved rounds",
            ("stage", "inputs", "batch", "bf16", "fused s/step", "auto s/step", "speed-up"),
            left=("stage", "inputs"),
        )
        for stage, m in stages.items():
            t.add_row(
                stage,
                m["inputs"],
                str(m["batch_size"]),
                "yes" if m["bf16"] else "no",
                f"{m['fused_s_per_step']:.3f}",
                f"{m['auto_s_per_step']:.3f}",
                f"{m['speedup']:.2f}x",
            )
        out.append(t)
    official = result.get("official")
    if official:
        t = column_table(
            "I-JEPA training step against the official code: same images, masks and weights, "
            f"alternating passes over {official['batches']} batches ({official['pairs']} pairs); "
            "speed-up: median and range of the paired ratios",
            ("precision", "ours s/step", "official s/step", "speed-up", "range", "first loss ours / official"),
            left=("precision",),
        )
        for precision, m in official["cases"].items():
            t.add_row(
                precision,
                f"{statistics.median(m['ours']):.3f}",
                f"{statistics.median(m['official']):.3f}",
                f"{m['speedup']:.2f}x",
                f"{min(m['ratios']):.2f}-{max(m['ratios']):.2f}x",
                f"{m['first_loss']['ours']:.6f} / {m['first_loss']['official']:.6f}",
            )
        out.append(t)
    return out
