import statistics

import pytest
import torch

from methods.masks import MaskConfig, MultiBlockMasker, block_size


def draw(masker, n, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [masker.sample(batch, gen) for _ in range(n)]


@pytest.mark.parametrize("edge", ["official", "corrected"])
def test_targets_and_context_never_overlap_and_keep_enough(edge):
    cfg = MaskConfig(edge=edge)
    masker = MultiBlockMasker(14, cfg)
    for ctx, targets in draw(masker, 200, batch=4):
        assert len(targets) == 4
        assert ctx.shape[1] > cfg.min_keep
        for b in range(4):
            c = set(ctx[b].tolist())
            assert len(c) == ctx.shape[1], "duplicate context indices"
            for t in targets:
                assert t.shape[1] > cfg.min_keep
                assert not c & set(t[b].tolist())


@pytest.mark.parametrize("edge", ["official", "corrected"])
def test_block_sizes_follow_the_scales(edge):
    gen = torch.Generator().manual_seed(1)
    for _ in range(500):
        h, w = block_size(gen, (14, 14), (0.15, 0.2), (0.75, 1.5), edge)
        # int(196 * s) patches for s in [0.15, 0.2], up to rounding of each side.
        assert 0.15 * 196 * 0.8 <= h * w <= 0.2 * 196 * 1.25
        assert 0.75 / 1.6 <= h / w <= 1.5 * 1.6
        h, w = block_size(gen, (14, 14), (0.85, 1.0), (1.0, 1.0), edge)
        assert (h, w) == ((13, 13) if edge == "official" else (h, w))
        assert h == w and h >= 13


def test_official_mode_never_touches_last_row_or_column_and_context_sits_top_left():
    masker = MultiBlockMasker(14, MaskConfig(edge="official"))
    for ctx, targets in draw(masker, 300):
        for idx in [ctx[0], *[t[0] for t in targets]]:
            rows, cols = idx // 14, idx % 14
            assert rows.max() < 13 and cols.max() < 13
        # the 13x13 context block can only start at (0, 0)
        full_block = set(range(14 * 14)) - {r * 14 + c for r in range(14) for c in range(14) if r == 13 or c == 13}
        assert set(ctx[0].tolist()) <= full_block


def test_corrected_mode_reaches_the_last_row_and_column():
    masker = MultiBlockMasker(14, MaskConfig(edge="corrected"))
    rows, cols = set(), set()
    for ctx, targets in draw(masker, 300):
        for idx in [ctx[0], *[t[0] for t in targets]]:
            rows |= set((idx // 14).tolist())
            cols |= set((idx % 14).tolist())
    assert 13 in rows and 13 in cols


def test_official_mode_matches_the_statistics_of_the_released_collator():
    # Measured on the official collator at 224/16 over 2,000 samples:
    # context 81.8 +- 13.6 patches, targets 33.3 +- 2.8 patches per block.
    masker = MultiBlockMasker(14, MaskConfig(edge="official"))
    samples = draw(masker, 2000, seed=3)
    ctx = [c.shape[1] for c, _ in samples]
    tgt = [t.shape[1] for _, ts in samples for t in ts]
    assert abs(statistics.mean(ctx) - 81.8) < 1.5 and abs(statistics.pstdev(ctx) - 13.6) < 1.5
    assert abs(statistics.mean(tgt) - 33.3) < 0.5 and abs(statistics.pstdev(tgt) - 2.8) < 0.5


def test_batch_is_cut_to_the_shortest_and_is_deterministic():
    masker = MultiBlockMasker(8, MaskConfig(min_keep=4))
    a = draw(masker, 5, batch=8, seed=7)
    b = draw(masker, 5, batch=8, seed=7)
    for (ca, ta), (cb, tb) in zip(a, b):
        assert torch.equal(ca, cb) and all(torch.equal(x, y) for x, y in zip(ta, tb))
        assert ca.shape[0] == 8 and all(t.shape == ta[0].shape for t in ta)


def test_impossible_settings_fail_at_construction():
    with pytest.raises(ValueError, match="min_keep"):
        MultiBlockMasker(4, MaskConfig(min_keep=4))
    with pytest.raises(ValueError, match="edge"):
        MaskConfig(edge="sideways")
    with pytest.raises(ValueError, match="target_scale"):
        MaskConfig(target_scale=(0.2, 1.5))
