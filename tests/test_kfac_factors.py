"""K-FAC factors against brute-force references written here (docs/method.md §1, §2).

References:
* patch vectors of a conv come from a ONE-HOT conv (a Conv2d whose output channel (c, i, j)
  copies input channel c at kernel offset (i, j)), so PyTorch's own conv resolves stride,
  string padding, padding modes, dilation and groups; checked against F.unfold for int padding;
* channel mode A = Σ over kernel offsets of the per-offset channel outer products of those
  patch vectors, divided by (rows · K);
* g = ∂ℓ_n/∂s from a loop over single examples (the loss of ONE example, autograd);
* the exact case: one example through a Linear, where vec(G) vec(G)ᵀ = S ⊗ A exactly;
* the true Fisher: for softmax cross entropy E_{y~p}[g gᵀ] = diag(p) − p pᵀ (analytic), with a
  tolerance from the exact Monte-Carlo variance.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tp_eigendamage as ted




# -- references ------------------------------------------------------------------------------
def patch_vectors(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``(G, N·L, d·K)`` im2col rows per group, via a one-hot conv with ``conv``'s geometry."""
    G, kh, kw = conv.groups, *conv.kernel_size
    d = conv.in_channels // G
    eye = torch.eye(d * kh * kw).view(d * kh * kw, d, kh, kw)
    probe = nn.Conv2d(conv.in_channels, G * d * kh * kw, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=G, bias=False,
                      padding_mode=conv.padding_mode)
    with torch.no_grad():
        probe.weight.copy_(eye.repeat(G, 1, 1, 1))
        out = probe(x)
    n, _, oh, ow = out.shape
    return out.view(n, G, d * kh * kw, oh * ow).permute(1, 0, 3, 2).reshape(G, -1, d * kh * kw)


def reference_A(conv: nn.Conv2d, x: torch.Tensor, mode: str):
    """``(A, E a)`` per group: patch mode over patch vectors, channel mode over every
    (location, kernel offset) channel vector."""
    rows = patch_vectors(conv, x).double()
    if mode == "channel":
        G, R, _ = rows.shape
        K = conv.kernel_size[0] * conv.kernel_size[1]
        rows = rows.view(G, R, -1, K).transpose(2, 3).reshape(G, R * K, -1)
    return rows.transpose(1, 2) @ rows / rows.shape[1], rows.mean(1)


def reference_S(model, layer, xs, ys, groups=1):
    """``E_n[Σ_uses Σ_t g gᵀ]`` with ``g = ∂ℓ_n/∂s`` from one example at a time."""
    total = 0
    for x, y in zip(xs, ys):
        outs = []
        h = layer.register_forward_hook(lambda m, i, o: outs.append(o))
        try:
            loss = F.cross_entropy(model(x[None]), y[None])
        finally:
            h.remove()
        for g in torch.autograd.grad(loss, outs):
            g = g.double()
            if g.dim() == 4:   # conv: (1, C, H, W) -> per group rows (G, HW, C/G)
                g = g.view(groups, -1, g.shape[-2] * g.shape[-1]).transpose(1, 2)
            else:              # linear: (1, ..., C) -> (1, rows, C)
                g = g.reshape(1, -1, g.shape[-1])
            total = total + g.transpose(1, 2) @ g
    return total / len(xs)


def close(ours, ref, rtol=1e-4):
    ours = ours.double()
    ref = ref.reshape(ours.shape).double()
    err = (ours - ref).abs().max().item()
    assert err <= rtol * ref.abs().max().item() + 1e-7, f"max abs error {err:.3g}"


def empirical(model, batches, **kw):
    return ted.collect_kfac(model, batches, fisher_type="empirical", progress=False, **kw)


class ConvNet(nn.Module):
    def __init__(self, conv: nn.Conv2d, hw: int, classes: int = 3):
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            n = conv(torch.zeros(1, conv.in_channels, hw, hw)).numel()
        self.head = nn.Linear(n, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


CONVS = {
    "stride2_pad1": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
    "pad2_nobias": lambda: nn.Conv2d(3, 5, 3, padding=2, bias=False),
    "same_even_kernel": lambda: nn.Conv2d(3, 4, (2, 4), padding="same"),
    "valid": lambda: nn.Conv2d(3, 4, 3, padding="valid"),
    "reflect": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    "circular_stride": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular"),
    "dilation2": lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2),
    "dilation_stride_rect": lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    "groups2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
    "depthwise_mult": lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3),
}


@pytest.mark.parametrize("mode", ["channel", "patch"])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_factors_match_brute_force(name, mode):
    torch.manual_seed(0)
    conv = CONVS[name]()
    hw = 7
    model = ConvNet(conv, hw)
    xs, ys = torch.randn(5, conv.in_channels, hw, hw), torch.randint(0, 3, (5,))
    f = empirical(model, [(xs[:2], ys[:2]), (xs[2:], ys[2:])], factor_mode=mode)[conv]

    A_ref, mean_ref = reference_A(conv, xs, mode)
    close(f.input_blocks, A_ref)
    close(f.input_mean, mean_ref)
    close(f.grad_blocks, reference_S(model, conv, xs, ys, groups=conv.groups))
    G = conv.groups
    assert f.input_blocks.shape[0] == G and f.grad_blocks.shape[0] == G
    assert f.input_factor.dim() == (2 if G == 1 else 3)
    # the homogeneous factor appends the constant 1 to every row
    rows = patch_vectors(conv, xs).double()
    if mode == "channel":
        K = conv.kernel_size[0] * conv.kernel_size[1]
        rows = rows.view(G, rows.shape[1], -1, K).transpose(2, 3).reshape(G, rows.shape[1] * K, -1)
    rows1 = torch.cat([rows, torch.ones(*rows.shape[:2], 1, dtype=rows.dtype)], -1)
    close(f.homogeneous_input_factor(), rows1.transpose(1, 2) @ rows1 / rows1.shape[1])


class PooledNet(nn.Module):
    def __init__(self, conv: nn.Conv2d, classes: int = 3):
        super().__init__()
        self.conv, self.head = conv, nn.Linear(conv.out_channels, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["channel", "patch"])
def test_wide_layer_factors_match_brute_force(mode):
    """Factors with at least ``SYMMETRIC_SPLIT_ROWS`` rows are computed block by block
    (``layers.symmetric_product``): input, gradient and head factors of 300 / 260 channels."""
    torch.manual_seed(4)
    conv = nn.Conv2d(300, 260, 1)
    model = PooledNet(conv)
    xs, ys = torch.randn(4, 300, 5, 5), torch.randint(0, 3, (4,))
    stats = empirical(model, [(xs[:2], ys[:2]), (xs[2:], ys[2:])], factor_mode=mode)
    close(stats[conv].input_blocks, reference_A(conv, xs, mode)[0])
    close(stats[conv].grad_blocks, reference_S(model, conv, xs, ys))
    pooled = torch.tanh(conv(xs)).mean((2, 3)).detach().double()
    close(stats[model.head].input_factor, pooled.T @ pooled / 4)


def test_symmetric_product_equals_the_full_product():
    from tp_eigendamage.layers import SYMMETRIC_SPLIT_ROWS, symmetric_product

    torch.manual_seed(5)
    for rows in (SYMMETRIC_SPLIT_ROWS - 1, SYMMETRIC_SPLIT_ROWS, 2 * SYMMETRIC_SPLIT_ROWS + 89):
        r = torch.randn(2, rows, 37, dtype=torch.float64)
        torch.testing.assert_close(symmetric_product(r), r @ r.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_one_hot_patches_agree_with_unfold():
    """The reference's patch vectors are F.unfold's for zero int padding."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1))
    x = torch.randn(2, 3, 8, 7)
    unf = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    torch.testing.assert_close(patch_vectors(conv, x)[0], unf.transpose(1, 2).reshape(-1, unf.shape[1]))


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):                       # (N, T, D)
        return self.fc2(F.gelu(self.fc1(x)).mean(1))


def test_linear_on_tokens_and_on_rows():
    torch.manual_seed(2)
    model = TokenNet()
    xs, ys = torch.randn(5, 7, 4), torch.randint(0, 3, (5,))
    stats = empirical(model, [(xs[:3], ys[:3]), (xs[3:], ys[3:])])
    rows = xs.reshape(-1, 4).double()
    close(stats[model.fc1].input_factor, rows.T @ rows / rows.shape[0])      # mean over N·T rows
    close(stats[model.fc1].grad_factor, reference_S(model, model.fc1, xs, ys))  # Σ_t per example
    h = F.gelu(model.fc1(xs)).mean(1).detach().double()                      # (N, D) rows
    close(stats[model.fc2].input_factor, h.T @ h / 5)
    close(stats[model.fc2].grad_factor, reference_S(model, model.fc2, xs, ys))


def test_single_example_linear_is_the_exact_fisher():
    """One example: G = g aᵀ, so vec(G) vec(G)ᵀ = S ⊗ A exactly (row-major vec)."""
    torch.manual_seed(3)
    lin = nn.Linear(5, 4)
    x, y = torch.randn(1, 5), torch.tensor([2])
    (G,) = torch.autograd.grad(F.cross_entropy(lin(x), y), [lin.weight])
    fisher = torch.outer(G.flatten(), G.flatten()).double()
    f = empirical(lin, [(x, y)])[lin]
    close(torch.kron(f.grad_factor.double(), f.input_factor.double()), fisher)


class DeepLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 3, bias=False), nn.Linear(3, 3, bias=False)

    def forward(self, x):
        return self.l2(self.l1(x))


def test_per_example_fisher_of_one_example_deep_linear():
    """Also exact for every layer of a deep linear net fed one example."""
    torch.manual_seed(4)
    model = DeepLinear()
    x, y = torch.randn(1, 4), torch.tensor([1])
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), [model.l1.weight, model.l2.weight])
    stats = empirical(model, [(x, y)])
    for layer, G in zip([model.l1, model.l2], grads):
        f = stats[layer]
        close(torch.kron(f.grad_factor.double(), f.input_factor.double()),
              torch.outer(G.flatten(), G.flatten()).double())


class SharedNet(nn.Module):
    """One Linear and one Conv2d, each used twice in a forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.lin = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = self.conv(torch.tanh(self.conv(x)))
        h = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.head(self.lin(torch.tanh(self.lin(h))))


@pytest.mark.parametrize("mode", ["channel", "patch"])
def test_weight_sharing_accumulates_every_use(mode):
    torch.manual_seed(5)
    model = SharedNet()
    xs, ys = torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4,))
    stats = empirical(model, [(xs, ys)], factor_mode=mode)
    x1 = torch.tanh(model.conv(xs)).detach()
    A1, _ = reference_A(model.conv, xs, mode)
    A2, _ = reference_A(model.conv, x1, mode)
    close(stats[model.conv].input_factor, (A1 + A2) / 2)           # both uses: same row count
    close(stats[model.conv].grad_factor, reference_S(model, model.conv, xs, ys))
    h1 = F.adaptive_avg_pool2d(model.conv(x1), 2).flatten(1).detach().double()
    h2 = torch.tanh(model.lin(h1.float())).detach().double()
    rows = torch.cat([h1, h2])
    close(stats[model.lin].input_factor, rows.T @ rows / rows.shape[0])
    close(stats[model.lin].grad_factor, reference_S(model, model.lin, xs, ys))


def test_factors_do_not_depend_on_the_batch_split():
    torch.manual_seed(6)
    model = ConvNet(nn.Conv2d(3, 4, 3, stride=2, padding=1), 8)
    xs, ys = torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,))
    splits = [[12], [5, 7], [1] * 12]
    results = []
    for sizes in splits:
        batches = list(zip(xs.split(sizes), ys.split(sizes)))
        results.append(empirical(model, batches))
    for layer in (model.conv, model.head):
        for other in results[1:]:
            torch.testing.assert_close(other[layer].input_factor, results[0][layer].input_factor,
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(other[layer].grad_factor, results[0][layer].grad_factor,
                                       rtol=1e-5, atol=1e-7)


class InplaceNet(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.act = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.act2 = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.conv(x)).flatten(1)
        h = self.fc(h)
        h = h.mul_(2.0) if self.inplace else h * 2.0   # inplace op straight on a Linear output
        return self.head(self.act2(h))


def test_inplace_ops_after_a_layer_see_the_pre_inplace_gradient():
    """S of a net with inplace ops equals the brute force on its out-of-place twin."""
    torch.manual_seed(7)
    inplace, twin = InplaceNet(True), InplaceNet(False)
    twin.load_state_dict(inplace.state_dict())
    xs, ys = torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4,))
    stats = empirical(inplace, [(xs, ys)])
    for name in ("conv", "fc"):
        layer = getattr(twin, name)
        close(stats[getattr(inplace, name)].grad_factor, reference_S(twin, layer, xs, ys))
    assert stats[inplace.conv].grad_factor.abs().max() > 0


def test_dict_batches_batch_fn_and_forward_fn():
    class KwNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, pixels, scale=1.0):
            return self.fc(pixels * scale)

    torch.manual_seed(8)
    model = KwNet()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ref = empirical(model, [(2 * x, y)])[model.fc]
    as_dict = empirical(model, [{"pixels": x, "scale": 2.0, "labels": y}])[model.fc]
    custom = empirical(model, [{"img": x, "cls": y}], batch_fn=lambda b: (b["img"], b["cls"]),
                       forward_fn=lambda m, inp: m(inp, scale=2.0))[model.fc]
    for f in (as_dict, custom):
        torch.testing.assert_close(f.input_factor, ref.input_factor)
        torch.testing.assert_close(f.grad_factor, ref.grad_factor)
    rows = (2 * x).double()
    close(ref.input_factor, rows.T @ rows / 6)


def test_true_fisher_matches_the_analytic_softmax_expectation():
    """fisher_type='true' with plain sampling (``y ~ p``): S → mean_n diag(p_n) − p_n p_nᵀ;
    tolerance = 5 × the exact Monte-Carlo standard deviation (enumerated over the C labels).
    The default, importance-sampled labels: tests/test_fidelity_terms.py."""
    torch.manual_seed(9)
    C, N, R = 3, 6, 4000
    lin = nn.Linear(4, C)
    x = torch.randn(N, 4)
    batch = x.repeat(R, 1)                         # each example drawn R times
    f = ted.collect_kfac(lin, [batch], fisher_type="true", sample_fn=ted.sample_categorical,
                         progress=False, mean_gradient=False)[lin]
    p = torch.softmax(lin(x), -1).detach().double()
    S_exact = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    gs = p[:, None, :] - torch.eye(C, dtype=p.dtype)[None]          # g for each label y: (N, y, C)
    outer = gs[..., :, None] * gs[..., None, :]                       # (N, y, C, C)
    mean_n = (p[..., None, None] * outer).sum(1)
    var_n = (p[..., None, None] * outer ** 2).sum(1) - mean_n ** 2
    std = (var_n.sum(0) / (N * N * R)).sqrt()
    err = (f.grad_factor.double() - S_exact).abs()
    assert (err <= 5 * std + 1e-6).all(), (err / std).max()
    rows = batch.double()
    close(f.input_factor, rows.T @ rows / rows.shape[0])
    # the empirical Fisher of fixed labels is a different matrix (the sampling is used)
    y0 = torch.zeros(N * R, dtype=torch.long)
    emp = ted.collect_kfac(lin, [(batch, y0)], fisher_type="empirical", progress=False)[lin]
    assert (emp.grad_factor.double() - S_exact).abs().max() > 20 * std.max()


def test_true_fisher_with_gaussian_sampler_is_identity():
    """Unit-variance Gaussian likelihood: E_y[g gᵀ] = I for g = f − y, y ~ N(f, I)."""
    torch.manual_seed(10)
    lin = nn.Linear(3, 2)
    x = torch.randn(20000, 3)
    f = ted.collect_kfac(lin, [x], fisher_type="true", sample_fn=ted.sample_gaussian,
                         loss_fn=ted.gaussian_nll, progress=False, mean_gradient=False)[lin]
    # entries of g gᵀ have variance ≤ 2 (χ²₁) → std of the mean ≤ sqrt(2/20000) = 0.01
    torch.testing.assert_close(f.grad_factor, torch.eye(2), atol=0.05, rtol=0)


def test_eigen_is_float64_clamped_and_reconstructs():
    torch.manual_seed(11)
    model = ConvNet(nn.Conv2d(4, 6, 3, padding=1, groups=2), 5)
    f = empirical(model, [(torch.randn(3, 4, 5, 5), torch.randint(0, 3, (3,)))])[model.conv]
    lam_a, q_a, lam_s, q_s = f.eigen()
    assert f.eigen()[0] is lam_a                                    # cached
    for lam, q, M in ((lam_a, q_a, f.input_factor), (lam_s, q_s, f.grad_factor)):
        assert lam.dtype == q.dtype == torch.float64 and (lam >= 0).all()
        close(q @ torch.diag_embed(lam) @ q.transpose(-1, -2), M, rtol=1e-5)
    # rank-one A (one example): eigenvalues below 1e-10·λ_max (round-off, negatives) → 0
    lin = nn.Linear(5, 3)
    g = empirical(lin, [(torch.randn(1, 5), torch.tensor([0]))])[lin]
    raw = torch.linalg.eigvalsh(g.input_factor.double())
    lam = g.eigen()[0]
    tiny = raw <= 1e-10 * raw[-1]
    assert tiny.sum() >= 1 and (lam[tiny] == 0).all()
    torch.testing.assert_close(lam[~tiny], raw[~tiny], rtol=1e-9, atol=1e-12 * raw[-1].item())
    assert raw[:-1].abs().max() < 1e-6 * raw[-1]
