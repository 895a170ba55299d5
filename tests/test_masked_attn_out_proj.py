import zlib

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_output_and_grads, gates64, rel_err, to64
from nodeprune_kernels import Gate, masked_attn_out_proj
from nodeprune_kernels.ops.gated_gemm import choose_split
from nodeprune_kernels.ops.masked_attn_out_proj import masked_attn_out_proj_reference
from nodeprune_kernels.utils.memory import SavedTensorBytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
B, S, H, HD, N = 2, 7, 6, 12, 40  # odd sizes; K = H * HD = 72 input features


def attn_output(layout, dtype, device, b=B, s=S):
    """An attention output [b, s, H, HD] laid out as attention kernels produce it."""
    if layout == "bshd":  # contiguous [B, S, H, D] (flash-attention's layout)
        t = torch.randn(b, s, H, HD, device=device)
    elif layout == "bhsd":  # SDPA's [B, H, S, D], read through a transpose: no dims merge
        t = torch.randn(b, H, s, HD, device=device).transpose(1, 2)
    elif layout == "sbhd":  # sequence-first [S, B, H, D]
        t = torch.randn(s, b, H, HD, device=device).transpose(0, 1)
    else:  # padded heads: [B, S, H, D + 4][..., :D], heads and head dims do not merge
        t = torch.randn(b, s, H, HD + 4, device=device)[..., :HD]
    return t.to(dtype)


def make_gates(spec, device):
    """'L' layer, 'A' attention block, 'H' head, 'n' attention neuron, 'o' output features."""
    K = H * HD
    levels = {"L": (1, K), "A": (1, K), "H": (H, HD), "n": (K, 1), "o": (N, 1)}
    in_gates, out_gates, offset = [], [], 0
    for c in spec:
        n, group = levels[c]
        la = (torch.randn(n, device=device) * 1.5 + 1.0).requires_grad_()
        (out_gates if c == "o" else in_gates).append(Gate(la, group, offset))
        offset += n
    return in_gates, out_gates


def check_against_reference(x, w, b, in_gates, out_gates, fused, x_ablate=None, layout="out_in", training=True,
                            seed=5):
    kw = dict(x_ablate=x_ablate, seed=seed, training=training, weight_layout=layout)
    y = masked_attn_out_proj(x, w, b, in_gates=in_gates, out_gates=out_gates, backend=fused, **kw)
    assert y.shape == (*x.shape[:-2], N)
    g64 = [gates64(in_gates), gates64(out_gates)]
    x64 = to64(x).requires_grad_()
    y_ref = masked_attn_out_proj_reference(x64, to64(w), to64(b), in_gates=g64[0], out_gates=g64[1],
                                           **dict(kw, x_ablate=to64(x_ablate)))
    leaves = [x] + [g.log_alpha for g in in_gates + out_gates]
    leaves64 = [x64] + [g.log_alpha for g in g64[0] + g64[1]]
    names = ["dx"] + [f"d log_alpha[{i}]" for i in range(len(leaves) - 1)]
    assert_output_and_grads(y, y_ref, leaves, leaves64, x.dtype, names)


def weight(dtype, device, layout="out_in"):
    w = torch.randn(N, H * HD, device=device) / (H * HD) ** 0.5
    return (w if layout == "out_in" else w.t().contiguous()).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "sbhd", "strided"])
@pytest.mark.parametrize("ablation", ["zero", "mean", "interchange"])
def test_matches_reference_in_every_layout(dtype, layout, ablation, fused, device):
    torch.manual_seed(zlib.crc32(f"{dtype}-{layout}-{ablation}".encode()))
    x = attn_output(layout, dtype, device).requires_grad_()
    x_ablate = {"zero": None, "mean": torch.randn(H, HD, device=device).to(dtype),
                "interchange": attn_output("bhsd", dtype, device)}[ablation]  # corrupted run, its own layout
    in_gates, out_gates = make_gates("LAHno", device)
    check_against_reference(x, weight(dtype, device), torch.randn(N, device=device).to(dtype), in_gates, out_gates,
                            fused, x_ablate)


@pytest.mark.parametrize("gates", ["L", "A", "H", "n", "o", "Hn"])
def test_each_gate_level_alone(gates, fused, device):
    torch.manual_seed(zlib.crc32(gates.encode()))
    x = attn_output("bhsd", torch.float32, device).requires_grad_()
    in_gates, out_gates = make_gates(gates, device)
    check_against_reference(x, weight(torch.float32, device), None, in_gates, out_gates, fused,
                            attn_output("bshd", torch.float32, device))


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("training", [True, False])
def test_weight_layouts_and_modes(layout, training, fused, device):
    torch.manual_seed(3)
    x = attn_output("sbhd", torch.float32, device).requires_grad_()
    in_gates, out_gates = make_gates("Hn", device)
    check_against_reference(x, weight(torch.float32, device, layout), None, in_gates, out_gates, fused,
                            torch.randn(H * HD, device=device), layout=layout, training=training)


def test_attention_layouts_are_read_in_place():
    """The transposed SDPA output and the sequence-first layout need no copy (two splits at most)."""
    for layout, expect in (("bshd", (1, 1)), ("bhsd", (S, HD)), ("sbhd", (S, 1)), ("strided", (1, HD))):
        assert tuple(choose_split(attn_output(layout, torch.float32, "cpu"), 2)) == expect, layout


def test_closed_heads_and_neurons_zero_weight_columns(fused, device):
    torch.manual_seed(4)
    x = attn_output("bhsd", torch.float32, device)
    w, b = weight(torch.float32, device), torch.randn(N, device=device)
    head = torch.full((H,), 20.0, device=device)
    head[[1, 4]] = -20.0
    neuron = torch.full((H * HD,), 20.0, device=device)
    neuron[[0, 13, 71]] = -20.0
    y = masked_attn_out_proj(x, w, b, in_gates=[Gate(head, HD), Gate(neuron, 1, H)], training=False,
                             backend=fused)
    w_cut = w.clone()
    for h in (1, 4):
        w_cut[:, h * HD:(h + 1) * HD] = 0
    w_cut[:, [0, 13, 71]] = 0
    torch.testing.assert_close(y, F.linear(x.flatten(-2), w_cut, b), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# A whole attention block with grouped-query attention: the output projection takes SDPA's output as it lies


class GQAAttention(torch.nn.Module):
    """q/k/v/o projections, H query heads sharing H_KV key/value heads (frozen), causal SDPA."""

    def __init__(self, d_model, n_heads, n_kv_heads, head_dim, device, dtype):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.h, self.h_kv, self.d = n_heads, n_kv_heads, head_dim
        self.q = torch.nn.Linear(d_model, n_heads * head_dim, **kw)
        self.k = torch.nn.Linear(d_model, n_kv_heads * head_dim, **kw)
        self.v = torch.nn.Linear(d_model, n_kv_heads * head_dim, **kw)
        self.o = torch.nn.Linear(n_heads * head_dim, d_model, **kw)
        self.requires_grad_(False)

    def attend(self, x):
        """SDPA's output [B, H, S, D]."""
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, s, self.h_kv, self.d).transpose(1, 2).repeat_interleave(self.h // self.h_kv, 1)
        v = self.v(x).view(b, s, self.h_kv, self.d).transpose(1, 2).repeat_interleave(self.h // self.h_kv, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(self, x):  # the unmasked block, the ordinary way
        o = self.attend(x)
        return self.o(o.transpose(1, 2).reshape(*x.shape[:2], -1))

    def masked(self, x, backend, **kw):
        return masked_attn_out_proj(self.attend(x).transpose(1, 2), self.o.weight, backend=backend, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_block_matches_reference(dtype, fused, device):
    torch.manual_seed(5)
    d_model, n_kv = N, 2
    attn = GQAAttention(d_model, H, n_kv, HD, device, dtype)
    x = torch.randn(B, S, d_model, device=device).to(dtype).requires_grad_()
    x_c = torch.randn(B, S, d_model, device=device).to(dtype)
    in_gates, out_gates = make_gates("LAHn", device)
    with torch.no_grad():
        corrupted = attn.attend(x_c).transpose(1, 2)  # the interchange values, in SDPA's layout
    kw = dict(in_gates=in_gates, out_gates=out_gates, x_ablate=corrupted, seed=9)
    y = attn.masked(x, fused, **kw)
    y_ref = attn.masked(x, "reference", **kw)
    leaves = [x] + [g.log_alpha for g in in_gates]
    dy = torch.randn_like(y)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(y, y_ref) < tol
    for a, r in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_ref, leaves, dy)):
        assert torch.all(a == 0) if torch.all(r == 0) else rel_err(a, r) < tol


@pytest.mark.parametrize("ablation", ["zero", "interchange"])
def test_gqa_block_saves_no_more_than_the_unmasked_block(ablation, fused, device):
    """The output projection saves a reference to SDPA's own output: the masked block saves exactly what
    the unmasked frozen block saves, plus the gate parameters (plus, for interchange, the corrupted
    attention output, one d_model vector per token)."""
    torch.manual_seed(6)
    d_model = N
    attn = GQAAttention(d_model, H, 3, HD, device, torch.bfloat16)
    params = list(attn.parameters())
    x = torch.randn(B, 33, d_model, device=device).to(torch.bfloat16).requires_grad_()
    in_gates, out_gates = make_gates("LAHno", device)
    las = [g.log_alpha for g in in_gates + out_gates]
    corrupted = attn.attend(torch.randn_like(x)).transpose(1, 2).detach() if ablation == "interchange" else None
    with SavedTensorBytes(ignore=params) as frozen:
        attn(x)
    with SavedTensorBytes(ignore=params) as saved:
        attn.masked(x, fused, in_gates=in_gates, out_gates=out_gates, x_ablate=corrupted)
    gate_bytes = sum(la.untyped_storage().nbytes() for la in las)
    extra = corrupted.untyped_storage().nbytes() if corrupted is not None else 0
    assert saved.bytes == frozen.bytes + gate_bytes + extra, (saved.tensors, frozen.tensors)
    with SavedTensorBytes(ignore=params) as eager:
        attn.masked(x, "reference", in_gates=in_gates, out_gates=out_gates, x_ablate=corrupted)
    assert eager.bytes > saved.bytes


@pytest.mark.parametrize("backend", ["triton", "native", "reference"])
def test_bad_inputs_get_clear_errors(backend, device):
    x = attn_output("bshd", torch.float32, device)
    w = weight(torch.float32, device)

    def call(**kw):
        args = dict(backend=backend)
        args.update(kw)
        return masked_attn_out_proj(args.pop("x", x), args.pop("w", w), **args)

    with pytest.raises(ValueError, match="x has 72 input features but weight has shape"):
        call(w=torch.randn(N, H * HD + 1, device=device))
    with pytest.raises(ValueError, match="at least 2 dimension"):
        call(x=torch.randn(H * HD, device=device))
    with pytest.raises(ValueError, match="x_ablate must be"):
        call(x_ablate=torch.zeros(H, HD + 1, device=device))
    with pytest.raises(ValueError, match="tile the feature dimension"):
        call(in_gates=[Gate(torch.zeros(H + 1, device=device), HD)])
    with pytest.raises(TypeError, match="bias is torch.float16"):
        call(bias=torch.zeros(N, dtype=torch.float16, device=device))
