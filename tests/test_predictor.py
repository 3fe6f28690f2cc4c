import pytest
import torch

from methods.vit import Predictor


def build(conditioning, action_dim=7):
    torch.manual_seed(0)
    return Predictor(
        num_patches=16,
        grid=4,
        embed_dim=32,
        predictor_dim=24,
        depth=2,
        num_heads=2,
        conditioning=conditioning,
        action_dim=action_dim if conditioning != "none" else 0,
    ).eval()


def inputs(batch=3):
    torch.manual_seed(1)
    ctx_idx = torch.stack([torch.randperm(16)[:6] for _ in range(batch)])
    tgt_idx = torch.stack([torch.randperm(16)[:4] for _ in range(batch)])
    return torch.randn(batch, 6, 32), ctx_idx, tgt_idx


@pytest.mark.parametrize("mode", ["feature", "sequence"])
def test_conditioned_predictor_output_follows_the_action(mode):
    p = build(mode)
    context, ctx_idx, tgt_idx = inputs()
    a, b = torch.zeros(3, 7), torch.zeros(3, 7)
    b[:, 0] = 0.5
    with torch.no_grad():
        out_a, out_b = p(context, ctx_idx, tgt_idx, a), p(context, ctx_idx, tgt_idx, b)
        null = p(context, ctx_idx, tgt_idx)
    assert out_a.shape == (3, 4, 32)
    assert not torch.allclose(out_a, out_b, atol=1e-5)
    assert torch.equal(null, out_a)  # no action = the null action


def test_unconditioned_predictor_ignores_the_action_and_keeps_official_names():
    p = build("none")
    context, ctx_idx, tgt_idx = inputs()
    with torch.no_grad():
        assert torch.equal(p(context, ctx_idx, tgt_idx, torch.randn(3, 7)), p(context, ctx_idx, tgt_idx))
    top = {k.split(".")[0] for k in p.state_dict()}
    assert top == {
        "mask_token",
        "predictor_pos_embed",
        "predictor_embed",
        "predictor_blocks",
        "predictor_norm",
        "predictor_proj",
    }


def test_sequence_conditioning_adds_one_token_per_action_scalar():
    p = build("sequence", action_dim=5)
    assert len(p.action_proj) == 5 and all(m.in_features == 1 for m in p.action_proj)
    f = build("feature", action_dim=5)
    assert (
        f.action_mixer[0].in_features == 24 + 5
        and len([m for m in f.action_mixer if isinstance(m, torch.nn.Linear)]) == 3
    )


def test_bad_conditioning_is_refused():
    with pytest.raises(ValueError, match="conditioning"):
        Predictor(16, 4, 32, 24, conditioning="film")
    with pytest.raises(ValueError, match="action_dim"):
        Predictor(16, 4, 32, 24, conditioning="feature", action_dim=0)
