"""The attentive probe head against the official V-JEPA AttentiveClassifier.

The fixture comes from the official code (scripts/fixtures/jepa_attentive.py says how to
regenerate it): official state dicts, the tokens they ran on and what they returned.
"""

import math
from pathlib import Path

import pytest
import torch

from tasks.heads import AttentiveClassifier, AttentivePooler

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "official" / "jepa_attentive.pt")
CASES = sorted(FIXTURE["cases"])


def ours_like(case: dict) -> AttentiveClassifier:
    kw = case["kwargs"]
    return AttentiveClassifier(
        kw["embed_dim"], kw["num_classes"], kw["num_heads"], mlp_ratio=kw["mlp_ratio"], depth=kw["depth"]
    )


def loaded(case: dict) -> AttentiveClassifier:
    head = ours_like(case).eval()
    head.load_state_dict(case["state_dict"], strict=True)  # same names and shapes, no key mapping
    return head


@pytest.mark.parametrize("name", CASES)
def test_official_weights_give_the_official_pooled_vectors_and_logits(name):
    case = FIXTURE["cases"][name]
    head = loaded(case)
    with torch.no_grad():
        pooled, logits = head.pooler(case["tokens"]), head(case["tokens"])
    assert pooled.shape == case["pooled"].shape and logits.shape == case["logits"].shape
    torch.testing.assert_close(pooled, case["pooled"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, case["logits"], atol=1e-5, rtol=0)


def inverse_cdf_trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    """Truncated normal by pushing uniform draws through the inverse normal CDF: the sampler of
    the official code (and of torch before 2.14, whose nn.init.trunc_normal_ now rejection-samples
    the same distribution with other draws)."""

    def cdf(x):
        return 0.5 * (1.0 + math.erf((x - mean) / (std * math.sqrt(2.0))))

    with torch.no_grad():
        tensor.uniform_(2 * cdf(a) - 1, 2 * cdf(b) - 1).erfinv_()
        return tensor.mul_(std * math.sqrt(2.0)).add_(mean).clamp_(a, b)


@pytest.mark.parametrize("name", CASES)
def test_the_official_seed_and_sampler_draw_the_official_initial_weights(name, monkeypatch):
    """Same seed and sampler, same weights bit for bit: every tensor is initialised as the
    official one is (trunc normal, zeros, ones, rescaling, torch's default for the classifier)
    and in the official order of random draws."""
    case = FIXTURE["cases"][name]
    monkeypatch.setattr(torch.nn.init, "trunc_normal_", inverse_cdf_trunc_normal_)
    torch.manual_seed(case["seed"])
    ours = ours_like(case).state_dict()
    assert ours.keys() == case["state_dict"].keys()
    for key, official in case["state_dict"].items():
        assert torch.equal(ours[key], official), key


@pytest.mark.parametrize("name", CASES)
def test_permuting_the_tokens_leaves_the_logits_unchanged(name):
    case = FIXTURE["cases"][name]
    head, tokens = loaded(case), case["tokens"]
    perm = torch.randperm(tokens.size(1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(head(tokens[:, perm]), head(tokens), atol=1e-5, rtol=0)


def test_a_fresh_head_has_the_official_init_statistics():
    """trunc-normal(0.02) query and matrices, zero biases, unit LayerNorms with eps 1e-5, each
    residual branch's output matrix divided by sqrt(2 * layer) (the cross-attention block is
    layer 1), and the classifier left at torch's default Linear init."""
    dim, std = 256, 0.02
    torch.manual_seed(0)
    head = AttentiveClassifier(dim, 10, num_heads=4, depth=3)
    pooler, cross = head.pooler, head.pooler.cross_attention_block

    def close(t, expected):
        return t.std().item() == pytest.approx(expected, rel=0.05) and abs(t.mean().item()) < 0.1 * expected

    assert close(AttentivePooler(dim, 4, num_queries=16).query_tokens, std)  # enough draws for a std
    for linear in (cross.xattn.q, cross.xattn.kv, *(b.attn.qkv for b in pooler.blocks), cross.mlp.fc1):
        assert close(linear.weight, std)
    rescaled = {1: [cross.xattn.proj, cross.mlp.fc2]}
    for layer, block in enumerate(pooler.blocks, 2):
        rescaled[layer] = [block.attn.proj, block.mlp.fc2]
    for layer, linears in rescaled.items():
        for linear in linears:
            assert close(linear.weight, std / math.sqrt(2 * layer)), (layer, linear)
    for name, p in pooler.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
    norms = [m for m in pooler.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 + 2 * 2
    assert all(n.eps == 1e-5 and torch.all(n.weight == 1) and not n.bias.any() for n in norms)
    bound = 1 / math.sqrt(dim)  # kaiming_uniform(a=sqrt(5)) and its bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert head.linear.weight.abs().max() <= bound and close(head.linear.weight, bound / math.sqrt(3))
    assert head.linear.bias.abs().max() <= bound and head.linear.bias.abs().min() > 0
