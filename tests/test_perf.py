"""The speed-ups compute what the plain path computes, and `bench perf` measures what it says.

Speed itself is never asserted: it depends on the machine and its load.
"""

import json
import math
import os
import statistics

import pytest
import torch
from omegaconf import OmegaConf

from benchmark import perf
from benchmark.config import load_config
from benchmark.core import synthetic
from benchmark.core.data import DataSource
from benchmark.core.layers import gather_tokens
from benchmark.pretrain import pretrain
from methods import build_method
from methods.mae import MAEDecoder
from methods.vit import PatchEmbed, Predictor
from tasks.linear import train_heads

# A case small enough to time in seconds: 32 px, 4 px patches, a 2-block encoder.
TINY_STEP = [
    "model=vit_micro",
    "model.depth=2",
    "model.patch_size=4",
    "data.image_size=32",
    "method.predictor.depth=1",
    "method.predictor.width=48",
    "method.mask.min_keep=4",
    "pretrain.batch_size=4",
    "data.num_train=16",
    "data.num_val=4",
]


def test_predictor_last_block_on_mask_tokens_only_equals_full_sequence():
    torch.manual_seed(0)
    for depth, conditioning, fused in (
        (0, "none", True),
        (1, "feature", True),
        (3, "sequence", True),
        (2, "feature", False),
    ):
        p = Predictor(64, 8, 32, 48, depth, 4, conditioning=conditioning, action_dim=7)
        for block in p.predictor_blocks:
            block.attn.fused_attn = fused
        ctx = torch.randn(3, 20, 32, requires_grad=True)
        ctx_idx, tgt_idx, action = torch.randint(0, 64, (3, 20)), torch.randint(0, 64, (3, 9)), torch.randn(3, 7)
        fast = p(ctx, ctx_idx, tgt_idx, action)
        (grad_fast,) = torch.autograd.grad(fast.square().sum(), ctx)
        # The plain computation: every block over the whole sequence, then keep the mask tokens.
        pos = p.predictor_pos_embed.expand(3, -1, -1)
        parts = [p.predictor_embed(ctx) + gather_tokens(pos, ctx_idx)]
        queries = p.mask_tokens(tgt_idx)
        if conditioning == "feature":
            queries = p.action_mixer(torch.cat([queries, action.unsqueeze(1).expand(-1, 9, -1)], -1))
        if conditioning == "sequence":
            parts.append(torch.stack([proj(action[:, i : i + 1]) for i, proj in enumerate(p.action_proj)], 1))
        x = torch.cat([*parts, queries], 1)
        for block in p.predictor_blocks:
            x = block(x)
        plain = p.predictor_proj(p.predictor_norm(x[:, -9:]))
        (grad_plain,) = torch.autograd.grad(plain.square().sum(), ctx)
        assert fast.shape == (3, 9, 32)
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_fast, grad_plain, rtol=1e-4, atol=1e-6)


def test_mae_decoder_last_block_on_queries_only_equals_full_sequence():
    torch.manual_seed(0)
    for depth, with_cls, with_extra in ((0, True, False), (1, True, False), (3, False, True)):
        dec = MAEDecoder(grid=8, embed_dim=32, width=24, depth=depth, num_heads=4, mlp_ratio=4.0, patch_size=4)
        ctx = torch.randn(2, 16, 32, requires_grad=True)
        cls = torch.randn(2, 1, 32) if with_cls else None
        extra = torch.randn(2, 3, 32) if with_extra else None
        ctx_idx, tgt_idx = torch.randperm(64)[:16].expand(2, -1), torch.randperm(64)[:48].expand(2, -1)
        fast = dec(ctx, ctx_idx, tgt_idx, cls=cls, extra=extra)
        (grad_fast,) = torch.autograd.grad(fast.square().sum(), ctx)
        # The plain computation: decoder_pred of the query positions of the full features.
        plain = dec.decoder_pred(dec.features(ctx, ctx_idx, tgt_idx, cls=cls, extra=extra)[:, -48:])
        (grad_plain,) = torch.autograd.grad(plain.square().sum(), ctx)
        assert fast.shape == (2, 48, 4 * 4 * 3)
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_fast, grad_plain, rtol=1e-4, atol=1e-6)


def test_patch_embedding_of_kept_patches_equals_the_convolution_then_gather():
    torch.manual_seed(0)
    embed = PatchEmbed(patch_size=4, in_chans=3, dim=24)
    images = torch.randn(3, 3, 32, 24)
    keep = torch.stack([torch.randperm(48)[:13] for _ in range(3)])
    fast = embed(images, keep)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), embed.proj.weight)
    plain = gather_tokens(embed(images), keep)
    (g_plain,) = torch.autograd.grad(plain.square().sum(), embed.proj.weight)
    assert fast.shape == (3, 13, 24)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fast, g_plain, rtol=1e-4, atol=1e-5)
    # Position 2 * 6 + 5 of a 32 x 24 image in 4 px patches is row 2, column 5: pixels [8:12, 20:24].
    one = embed(images, torch.full((3, 1), 2 * 6 + 5))[1, 0]
    by_hand = (embed.proj.weight * images[1, :, 8:12, 20:24]).sum((1, 2, 3)) + embed.proj.bias
    torch.testing.assert_close(one, by_hand, rtol=1e-5, atol=1e-6)


def test_head_grid_in_one_pass_equals_heads_one_at_a_time():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 16, generator=gen), torch.randint(0, 4, (120,), generator=gen)
    x[:, 0] += y  # learnable, so the heads move away from zero
    grid = train_heads(x, y, 4, [0.01, 0.3], [0.0, 1e-2], epochs=3, batch_size=32, seed=1)
    assert [(lr, wd) for lr, wd, _, _ in grid] == [(0.01, 0.0), (0.01, 1e-2), (0.3, 0.0), (0.3, 1e-2)]
    for lr, wd, head, _ in grid:
        ((_, _, alone, _),) = train_heads(x, y, 4, [lr], [wd], epochs=3, batch_size=32, seed=1)
        assert head.weight.abs().max() > 1e-3
        torch.testing.assert_close(head.weight, alone.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(head.bias, alone.bias, rtol=0, atol=1e-6)
    # Different learning rates and decays give different heads: the grid is not one head copied.
    assert not torch.allclose(grid[0][2].weight, grid[2][2].weight)
    assert not torch.allclose(grid[2][2].weight, grid[3][2].weight)


def test_head_grid_follows_torch_sgd():
    """One head of the batched grid = nn.Linear + torch.optim.SGD(momentum 0.9) with the cosine lr
    (perf.sgd_head, also the benchmark's conventional baseline)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    grid = train_heads(x, y, 3, [0.5, 0.05], [1e-2], epochs=2, batch_size=16, seed=4)
    for lr, wd, head, _ in grid:
        ref = perf.sgd_head(x, y, 3, lr, wd, epochs=2, batch_size=16, seed=4)
        assert ref.weight.abs().max() > 1e-3
        torch.testing.assert_close(head.weight, ref.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(head.bias, ref.bias, rtol=0, atol=1e-6)
    # A last batch smaller than the others (64 = 3 x 20 + 4) is handled like torch does.
    ((_, _, head, _),) = train_heads(x, y, 3, [0.5], [0.0], epochs=2, batch_size=20, seed=4)
    ref = perf.sgd_head(x, y, 3, 0.5, 0.0, epochs=2, batch_size=20, seed=4)
    torch.testing.assert_close(head.weight, ref.weight, rtol=0, atol=1e-6)


def test_head_grid_reports_each_heads_training_loss_per_epoch():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 8, generator=gen), torch.randint(0, 3, (96,), generator=gen)
    x[:, 0] += 3 * y
    (_, _, _, frozen), (_, _, _, learning) = train_heads(x, y, 3, [1e-9, 0.3], [0.0], epochs=8, batch_size=32, seed=2)
    # Zero weights that barely move: every epoch's mean cross-entropy is log(3).
    assert frozen == pytest.approx([math.log(3)] * 8, rel=1e-6)
    # A head that learns a separable problem: its loss falls (SGD noise aside) well below log(3).
    assert len(learning) == 8 and sum(learning[-2:]) < 0.5 * sum(learning[:2])
    assert learning[-1] < 0.5 * math.log(3)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("gen") / "shapes", 32, 8, 32, seed=2)
    return DataSource("shapes", root, "train", "val", 32)


@pytest.mark.parametrize("method,bf16", [("ijepa", False), ("iwm", True)])
def test_fast_defaults_train_like_the_plain_loop(source, tmp_path, method, bf16):
    """Fused AdamW and the attention choice (math kernel for bf16 on CPU) against the plain step."""
    losses, weights = {}, {}
    for fused in (False, True):
        plain = [] if fused else ["pretrain.fused_adamw=false", "pretrain.attention=fused"]
        cfg = OmegaConf.to_container(
            load_config(
                [
                    f"method={method}",
                    *TINY_STEP,
                    "pretrain.epochs=2",
                    f"pretrain.bf16={bf16}",
                    *plain,
                    "pretrain.log_every=1",
                    "pretrain.checkpoint_every=0",
                ]
            )
        )
        torch.manual_seed(0)
        m = build_method(method, cfg["model"], cfg["method"], 32)
        start = m.encoder.patch_embed.proj.weight.detach().clone()
        run = tmp_path / str(fused)
        pretrain(
            m, source, OmegaConf.create(cfg["pretrain"]), 0, torch.device("cpu"), run / "ckpt", cfg, show_progress=False
        )
        losses[fused] = [json.loads(line)["loss"] for line in open(run / "train_log.jsonl")]
        weights[fused] = m.encoder.patch_embed.proj.weight.detach()
        # Evaluation gets timm's kernels back, as a loaded checkpoint would.
        assert all(b.attn.fused_attn for b in m.encoder.blocks)
    assert len(losses[True]) == 16
    assert losses[True] == pytest.approx(losses[False], rel=1e-4 if not bf16 else 1e-2)
    # The weights moved the same way: their difference is small next to how far they moved.
    moved = (weights[False] - start).norm()
    assert moved > 0 and (weights[True] - weights[False]).norm() < (0.02 if bf16 else 1e-3) * moved


def test_timed_step_reports_every_measure(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    overrides = perf.case_overrides("ijepa", "fp32", "eager", False, False, TINY_STEP)
    assert overrides[:1] == ["method=ijepa"] and overrides[-3:] == perf.VARIANTS["eager"]
    assert "pretrain.bf16=False" in overrides and overrides.index("model=vit_micro") > overrides.index("model=vit_tiny")
    out = perf.time_training_step(overrides, steps=2, warmup=1, device="cpu", threads=None)
    # Two timed steps alone on built batches (after an untimed pass over the same two), two in the
    # loop fed by the workers; a loss for each of the six.
    assert len(out["seconds"]) == len(out["loop_seconds"]) == len(out["waits"]) == len(out["flops"]) == 2
    assert len(out["losses"]) == 6
    assert all(s > 0 for s in out["seconds"] + out["loop_seconds"]) and all(v > 0 for v in out["losses"])
    # FLOPs of a 2-block 32x32 ViT step: at least the target encoder's matmuls over 64 tokens x 4 images.
    cfg = load_config(overrides)
    d, tokens = cfg.model.embed_dim, 4 * 64
    assert min(out["flops"]) > 2 * 2 * tokens * 12 * d * d
    assert out["peak_memory_mib"] > 50 and out["data_seconds_per_batch"] > 0 and out["batch_size"] == 4
    again = perf.time_training_step(overrides, steps=2, warmup=1, device="cpu", threads=None)
    assert again["losses"] == out["losses"] and again["flops"] == out["flops"]  # deterministic


def test_numerics_check_and_summary():
    def case(variant, losses, precision="fp32"):
        return {"method": "ijepa", "precision": precision, "variant": variant, "losses": losses}

    cases = [
        case("eager", [1.0, 0.5]),
        case("fast", [1.0, 0.50001]),
        case("eager", [1.0], "bf16"),
        case("fast", [1.1], "bf16"),
    ]
    perf.check_numerics(cases, {"fp32": 1e-4, "bf16": 2e-2})
    assert cases[1]["equal_numerics"] and cases[1]["loss_rel_diff_vs_eager"] == pytest.approx(2e-5)
    assert not cases[3]["equal_numerics"] and "equal_numerics" not in cases[0]

    row = perf.summarise(
        {
            "method": "ijepa",
            "precision": "fp32",
            "gpu": False,
            "batch_size": 8,
            "seconds": [1.0, 2.0, 1.5],
            "loop_seconds": [1.2, 2.2, 1.7],
            "waits": [0.0, 0.01, 0.0],
            "flops": [100e9, 200e9, 150e9],
            "data_seconds_per_batch": 0.1,
        },
        {"fp32": 200.0, "bf16": 400.0},
        peak_tflops=1.0,
    )
    assert row["s_per_step"] == 1.5 and row["loop_s_per_step"] == 1.7 and row["images_per_s"] == pytest.approx(8 / 1.5)
    assert row["gflops"] == pytest.approx(100.0) and row["ceiling_fraction"] == pytest.approx(0.5)
    assert row["mfu"] == pytest.approx(0.1)
    assert not row["waits_for_data"]


def test_matmul_ceiling_is_a_rate():
    assert perf.matmul_ceiling(torch.device("cpu"), torch.float32, 256, repeats=2) > 0.1


def test_any_method_preset_is_a_perf_case_at_the_reference_size():
    """The three reference cases keep their settings; every other preset of `bench list` is timed
    as configured, at the reference model and resolution, and its config builds."""
    from benchmark.config import group_options, load_config
    from benchmark.perf import _TINY_224, CPU_CASES, available_methods, case_overrides

    assert available_methods()[:3] == list(CPU_CASES) and set(available_methods()) == set(group_options("method"))
    assert case_overrides("mae", "fp32", "fast", False, False, [])[: len(CPU_CASES["mae"])] == CPU_CASES["mae"]
    other = case_overrides("iwm_inv_cpu", "bf16", "eager", False, False, ["pretrain.batch_size=4"])
    assert other[: 1 + len(_TINY_224)] == ["method=iwm_inv_cpu", *_TINY_224] and "pretrain.batch_size=4" in other
    cfg = load_config(other)
    assert cfg.method.predictor.depth == 2 and cfg.model.name == "vit_tiny" and cfg.pretrain.bf16


def test_perf_cli_rejects_bad_input_before_compute(bench):
    proc = bench("perf", "--methods", "ijepa,simclr", check=2)
    assert "simclr" in proc.stderr and proc.stderr.count("\n") == 1
    proc = bench(
        "perf",
        "--methods",
        "ijepa",
        "--precision",
        "fp32",
        "--steps",
        "1",
        "--no-probe",
        "pretrain.batch_siz=3",
        check=2,
    )
    assert "pretrain.batch_size" in proc.stderr


@pytest.mark.slow
def test_compiled_step_trains_like_the_eager_step(source, tmp_path):
    losses = {}
    for compiled in (False, True):
        cfg = OmegaConf.to_container(
            load_config(
                [
                    "method=iwm",
                    *TINY_STEP,
                    "pretrain.epochs=1",
                    "pretrain.bf16=false",
                    f"pretrain.compile={compiled}",
                    "pretrain.log_every=1",
                    "pretrain.checkpoint_every=0",
                ]
            )
        )
        torch.manual_seed(0)
        m = build_method("iwm", cfg["model"], cfg["method"], 32)
        run = tmp_path / str(compiled)
        pretrain(
            m, source, OmegaConf.create(cfg["pretrain"]), 0, torch.device("cpu"), run / "ckpt", cfg, show_progress=False
        )
        losses[compiled] = [json.loads(line)["loss"] for line in open(run / "train_log.jsonl")]
    assert len(losses[True]) == 8
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_perf_cli_times_step_and_loop_over_interleaved_rounds(bench, tmp_path):
    """The whole benchmark on a tiny MAE: every case and round in its own process, one JSON."""
    tiny_mae = [
        "model=vit_micro",
        "model.depth=2",
        "model.patch_size=4",
        "data.image_size=32",
        "method.predictor.depth=1",
        "method.predictor.width=48",
        "pretrain.batch_size=4",
    ]
    out = tmp_path / "perf.json"
    proc = bench(
        "perf",
        "--methods",
        "mae",
        "--precision",
        "fp32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "2",
        "--threads",
        "1",
        "--no-probe",
        "--out",
        str(out),
        *tiny_mae,
        check=0,
    )
    assert "loop s/step" in proc.stdout and "rounds" in proc.stdout
    result = json.loads(out.read_text())
    eager, fast = result["cases"]
    for case in (eager, fast):
        assert len(case["seconds"]) == len(case["loop_seconds"]) == len(case["waits"]) == 4  # 2 steps x 2 rounds
        assert len(case["round_medians_s"]) == 2 and case["gflop_per_step"] > 0
        assert case["s_per_step"] == pytest.approx(statistics.median(case["seconds"]))
        assert "speedup_vs_reference" not in case  # a speed-up is only measured in the same run
    # Each round replays the same batches: same losses every round, and the fast path equals eager.
    assert fast["losses_every_round"][0] == fast["losses_every_round"][1]
    assert fast["equal_numerics"] and fast["loss_rel_diff_vs_eager"] < 1e-4


def test_task_stage_timing_runs_the_real_adapters_with_both_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    overrides = [
        "method=iwm",
        "model.depth=2",
        "method.predictor.depth=1",
        "data.num_train=16",
        "data.num_val=8",
        "tasks.predictor_ft.batch_size=4",
        "tasks.encoder_ft.batch_size=4",
    ]
    stages = perf.time_task_stages(overrides, threads=1, steps=1, warmup=0, rounds=1)
    assert set(stages) == {"predictor_ft", "encoder_ft"}
    assert stages["predictor_ft"]["inputs"] == "frozen tokens" and stages["encoder_ft"]["inputs"] == "images"
    for m in stages.values():
        assert m["batch_size"] == 4 and m["fused_s_per_step"] > 0 and m["auto_s_per_step"] > 0
        assert m["speedup"] == pytest.approx(m["fused_s_per_step"] / m["auto_s_per_step"])


def test_math_attention_computes_what_sdpa_computes():
    """The task stages' kernel choice changes speed, not the function (float32, same weights)."""
    from tasks_helpers import OVERRIDES

    from benchmark.core.layers import use_attention

    cfg = load_config(OVERRIDES)
    torch.manual_seed(0)
    method = build_method("iwm", OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.method), 32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = method.predict_full(method.eval_encoder()(images))
        use_attention(method, "math", torch.device("cpu"), bf16=False)
        math_out = method.predict_full(method.eval_encoder()(images))
    assert not torch.equal(fused, torch.zeros_like(fused))
    torch.testing.assert_close(math_out, fused, rtol=1e-4, atol=1e-5)


# --- against the official code --------------------------------------------------------------------
# The official I-JEPA code is not shipped: these run where IJEPA_CHECKOUT names a checkout of
# facebookresearch/ijepa (git clone https://github.com/facebookresearch/ijepa).
OFFICIAL = os.environ.get("IJEPA_CHECKOUT")
needs_official = pytest.mark.skipif(not OFFICIAL, reason="IJEPA_CHECKOUT (an official I-JEPA checkout) not set")
TINY_OFFICIAL = [
    "model.patch_size=8",
    "data.image_size=64",
    "data.num_train=16",
    "method.predictor.depth=1",
    "method.predictor.width=96",
    "method.mask.min_keep=4",
    "pretrain.batch_size=4",
]


def test_a_folder_that_is_not_the_official_code_is_refused_before_compute(bench, tmp_path):
    proc = bench("perf", "--methods", "ijepa", "--official-ijepa", str(tmp_path), check=2)
    assert "is not a checkout of facebookresearch/ijepa" in proc.stderr and proc.stderr.count("\n") == 1
    proc = bench("perf", "--methods", "mae", "--official-ijepa", str(tmp_path), check=2)
    assert "add ijepa to --methods" in proc.stderr


@needs_official
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_our_step_and_the_official_one_start_equal_and_are_timed_in_pairs(precision):
    from benchmark.perf import official as perf_official

    ov = perf.case_overrides("ijepa", precision, "fast", False, False, TINY_OFFICIAL)
    result = perf_official.time_against_official(OFFICIAL, ov, batches=3, pairs=3, device="cpu", threads=1)
    first = result["first_loss"]
    # Same weights, same batch: the first losses agree (bf16 rounds the two differently).
    assert first["ours"] == pytest.approx(first["official"], rel=1e-5 if precision == "fp32" else 2e-2)
    assert len(result["ours"]) == len(result["official"]) == len(result["ratios"]) == 3
    assert result["ratios"] == pytest.approx([t / o for o, t in zip(result["ours"], result["official"])])
    assert result["speedup"] == pytest.approx(statistics.median(result["ratios"]))
    assert all(0.2 < r < 5 for r in result["ratios"]), result  # the same work on both sides, give or take


@needs_official
def test_a_model_the_official_code_lacks_is_named():
    from benchmark.perf import official as perf_official

    ov = perf.case_overrides("ijepa", "fp32", "fast", False, False, [*TINY_OFFICIAL, "model=vit_micro"])
    with pytest.raises(perf_official.OfficialCodeError, match="the official code has no model vit_micro"):
        perf_official.time_against_official(OFFICIAL, ov, batches=1, pairs=1, device="cpu", threads=1)
