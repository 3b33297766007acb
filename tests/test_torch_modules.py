"""flashnumba.torch.modules: FlashAttention and MultiheadSelfAttention against float64 references.

Sized for the simulator: batch 1-2, seqlen <= 20, 1-2 heads, head dim 16; every
flashnumba call here is a few kernel launches of at most 256 simulated threads.
"""

import pytest

torch = pytest.importorskip("torch")

from conftest import rel_err

from flashnumba import philox, reference, registry
from flashnumba.torch.modules import FlashAttention, MultiheadSelfAttention, draw_seed

TOL = 1e-5


def qkv(B, Nq, Nk, H, H_kv, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Nq, H, d, generator=g, dtype=dtype)
    k = torch.randn(B, Nk, H_kv, d, generator=g, dtype=dtype)
    v = torch.randn(B, Nk, H_kv, d, generator=g, dtype=dtype)
    return q, k, v


def mhsa_float64(m, x):
    """MultiheadSelfAttention written out in float64 from m's weights: the reference for the layer."""
    W = {name: p.detach().double() for name, p in m.named_parameters()}
    x = x.detach().double()
    B, N, _ = x.shape
    H, H_kv, d = m.num_heads, m.num_kv_heads, m.head_dim
    q = (x @ W["q_proj.weight"].T + W["q_proj.bias"]).view(B, N, H, d).transpose(1, 2)
    k = (x @ W["k_proj.weight"].T + W["k_proj.bias"]).view(B, N, H_kv, d).transpose(1, 2)
    v = (x @ W["v_proj.weight"].T + W["v_proj.bias"]).view(B, N, H_kv, d).transpose(1, 2)
    k, v = k.repeat_interleave(H // H_kv, dim=1), v.repeat_interleave(H // H_kv, dim=1)
    S = q @ k.transpose(-1, -2) / d ** 0.5                        # S = Q K^T / sqrt(d)
    if m.causal:
        S = S.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    O = torch.softmax(S, dim=-1) @ v                              # O = softmax(S) V
    return O.transpose(1, 2).reshape(B, N, H * d) @ W["out_proj.weight"].T + W["out_proj.bias"]


# ---------------------------------------------------------------------------
# FlashAttention: the module over flash_attn_func
# ---------------------------------------------------------------------------

# (B, Nq, Nk, H, H_kv, d, causal): Nq != Nk with the causal diagonal bottom-right,
# grouped-query heads, a head dim that is not a bucket size.
FLASH_CASES = {
    "causal-Nq<Nk-gqa": (1, 12, 20, 2, 1, 16, True),
    "full-d24": (2, 16, 16, 2, 2, 24, False),
}


@pytest.mark.parametrize("algorithm", registry.names("float32"))
@pytest.mark.parametrize("case", FLASH_CASES)
def test_flash_attention_matches_float64_reference(algorithm, case):
    B, Nq, Nk, H, H_kv, d, causal = FLASH_CASES[case]
    q, k, v = qkv(B, Nq, Nk, H, H_kv, d)
    attn = FlashAttention(causal=causal, softmax_scale=0.3, algorithm=algorithm)
    out = attn(q, k, v)
    ref, _ = reference.attention(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                 causal=causal, softmax_scale=0.3)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert rel_err(out.numpy(), ref) <= TOL


def test_flash_attention_gradients_match_float64_reference():
    B, Nq, Nk, H, H_kv, d, causal = FLASH_CASES["causal-Nq<Nk-gqa"]
    q, k, v = (t.requires_grad_() for t in qkv(B, Nq, Nk, H, H_kv, d, seed=1))
    dout = torch.randn(B, Nq, H, d, generator=torch.Generator().manual_seed(2))
    out = FlashAttention(causal=causal)(q, k, v)
    assert out.grad_fn is not None
    out.backward(dout)
    refs = reference.attention_backward(dout.double().numpy(), *(t.detach().double().numpy()
                                                                 for t in (q, k, v)), causal=causal)
    for t, ref in zip((q, k, v), refs):
        assert t.grad.shape == t.shape
        assert rel_err(t.grad.numpy(), ref) <= TOL


def test_flash_attention_dropout_is_the_documented_philox_mask():
    """Train mode: O = (P o keep / (1 - p)) V with keep = philox.keep_mask(seed, ...), and the
    seed is the one draw_seed() takes from torch's generator right after torch.manual_seed."""
    p = 0.25
    B, Nq, Nk, H, H_kv, d = 1, 16, 16, 2, 2, 16
    q, k, v = qkv(B, Nq, Nk, H, H_kv, d, seed=3)
    attn = FlashAttention(causal=True, dropout=p).train()
    torch.manual_seed(7)
    out = attn(q, k, v)
    torch.manual_seed(7)
    seed = draw_seed()
    keep = philox.keep_mask(seed, p, B, H, Nq, Nk)
    ref, _ = reference.attention(*(t.double().numpy() for t in (q, k, v)), causal=True,
                                 dropout_p=p, dropout_mask=keep)
    assert rel_err(out.numpy(), ref) <= TOL


def test_flash_attention_dropout_train_changes_eval_does_not():
    q, k, v = qkv(1, 16, 16, 1, 1, 16, seed=4)
    attn = FlashAttention(causal=True, dropout=0.5)
    plain = FlashAttention(causal=True)(q, k, v)
    torch.manual_seed(0)
    first, second = attn.train()(q, k, v), attn(q, k, v)
    assert not torch.allclose(first, plain)              # masks drawn ...
    assert not torch.allclose(first, second)             # ... afresh on every call
    torch.manual_seed(0)
    assert torch.equal(attn(q, k, v), first)             # the same torch.manual_seed, the same masks
    assert torch.equal(attn.eval()(q, k, v), plain)      # eval: no dropout at all


def test_flash_attention_draws_no_seed_without_dropout():
    """Without dropout the module leaves torch's RNG stream alone (runs stay comparable)."""
    q, k, v = qkv(1, 8, 8, 1, 1, 16, seed=5)
    torch.manual_seed(0)
    FlashAttention(causal=True).train()(q, k, v)
    after = torch.randint(0, 2 ** 62, (1,))
    torch.manual_seed(0)
    assert torch.equal(after, torch.randint(0, 2 ** 62, (1,)))


def test_flash_attention_rejects_bad_options():
    with pytest.raises(ValueError, match="algorithm"):
        FlashAttention(algorithm="fa3")
    with pytest.raises(ValueError, match="dropout"):
        FlashAttention(dropout=1.0)


# ---------------------------------------------------------------------------
# MultiheadSelfAttention: projections around either attention
# ---------------------------------------------------------------------------

# The module's own behaviour (dropout modes, seeding, an optimizer step) on FA1's kernels, the
# cheapest on the simulator; the default kernels are the ones compared with the float64 reference
# and with torch's attention above and below.
CHEAP = "fa1"


def make_mhsa(attention, num_kv_heads=None, causal=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    return MultiheadSelfAttention(32, 2, num_kv_heads=num_kv_heads, causal=causal,
                                  attention=attention, **kwargs)


def tokens(B=2, N=16, E=32, seed=10):
    return torch.randn(B, N, E, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ["flashnumba", "torch"])
@pytest.mark.parametrize("num_kv_heads,causal", [(None, True), (1, False)])
def test_mhsa_matches_float64_reference(attention, num_kv_heads, causal):
    m = make_mhsa(attention, num_kv_heads, causal)
    x = tokens()
    out = m(x)
    assert out.shape == x.shape
    assert rel_err(out.detach().numpy(), mhsa_float64(m, x).numpy()) <= TOL


@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_mhsa_switches_agree_and_every_parameter_gets_a_gradient(num_kv_heads):
    """Same weights, attention="flashnumba" against "torch": outputs within 1e-5, and the
    gradients of every parameter (and of the input) within 1e-5 of each other."""
    m = make_mhsa("flashnumba", num_kv_heads)
    x = tokens().requires_grad_()
    results = {}
    for attention in ("flashnumba", "torch"):
        m.attention = attention
        m.zero_grad(set_to_none=True)
        x.grad = None
        out = m(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {name: p.grad for name, p in m.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), attention
        results[attention] = out.detach(), grads, x.grad.clone()
    (out_f, grads_f, dx_f), (out_t, grads_t, dx_t) = results["flashnumba"], results["torch"]
    assert (out_f - out_t).abs().max() <= 1e-5
    assert rel_err(dx_f.numpy(), dx_t.numpy()) <= TOL
    for name in grads_f:
        if name == "k_proj.bias":
            # q . (k_j + b) = q . k_j + q . b adds the same q . b to every key's score, which
            # softmax cancels: dL/db_k = 0 exactly, and both attentions leave only rounding.
            assert grads_f[name].abs().max() <= 1e-5 and grads_t[name].abs().max() <= 1e-5
            continue
        assert rel_err(grads_f[name].numpy(), grads_t[name].numpy()) <= TOL, name


def test_mhsa_dropout_train_changes_eval_does_not_and_seed_reproduces():
    m = make_mhsa("flashnumba", dropout=0.5, algorithm=CHEAP)
    x = tokens(B=1, seed=11)
    with torch.no_grad():
        m.eval()
        evaluated = m(x)
        assert torch.equal(m(x), evaluated)
        m.dropout = 0.0
        assert torch.equal(m.train()(x), evaluated)      # train mode, p = 0: the same numbers
        m.dropout = 0.5
        torch.manual_seed(1)
        dropped = m(x)
        torch.manual_seed(1)
        again = m(x)
    assert not torch.allclose(dropped, evaluated)
    assert torch.equal(dropped, again)


def test_mhsa_same_seed_same_weights_and_output():
    x = tokens(B=1, seed=12)
    a, b = make_mhsa("flashnumba", seed=3, algorithm=CHEAP), make_mhsa("flashnumba", seed=3, algorithm=CHEAP)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(make_mhsa("flashnumba", seed=4, algorithm=CHEAP)(x), a(x))


def test_mhsa_bfloat16_switches_agree():
    """bfloat16 weights and activations: both attentions within bfloat16 rounding of each other."""
    m = make_mhsa("flashnumba").to(torch.bfloat16)
    x = tokens(B=1, seed=13).to(torch.bfloat16).requires_grad_()
    out_f = m(x)
    out_f.float().square().sum().backward()
    assert out_f.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in m.parameters())
    m.attention = "torch"
    out_t = m(x)
    assert rel_err(out_f.detach().float().numpy(), out_t.detach().float().numpy()) <= 2e-2


def test_mhsa_trains_with_an_optimizer():
    """One AdamW step on a regression target through flashnumba's attention lowers the loss."""
    m = make_mhsa("flashnumba", algorithm=CHEAP)
    x, target = tokens(B=1, seed=14), tokens(B=1, seed=15)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss = (m(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def test_mhsa_rejects_bad_shapes_and_names():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MultiheadSelfAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        MultiheadSelfAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="attention"):
        MultiheadSelfAttention(32, 2, attention="sdpa")
    m = MultiheadSelfAttention(32, 2)
    with pytest.raises(ValueError, match="attention"):
        m.attention = "flash"
    assert m.head_dim == 16
