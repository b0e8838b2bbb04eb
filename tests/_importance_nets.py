"""Small networks, data and independent reference formulas for the importance tests.

Nothing here calls tp_eigendamage's damage code: the references are explicit loops over
channels and kernel offsets written from docs/method.md §4/§8.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp


class TinyNet(nn.Module):
    """Stem, a residual block (two convs feeding an add, the second grouped), a depthwise +
    pointwise pair, and a Linear on tokens."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.tok = nn.Linear(12, 6)
        self.head = nn.Linear(6, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.c2(F.relu(self.bn1(self.c1(x)))))
        x = F.relu(self.pw(self.dw(x)))
        tokens = self.tok(x.flatten(2).transpose(1, 2))        # (N, T, 12) -> (N, T, 6)
        return self.head(F.relu(tokens).mean(1))


def tiny_setup(seed=0):
    torch.manual_seed(seed)
    model = TinyNet().eval()
    for bn in (model.bn0, model.bn1):                            # non-trivial BN statistics
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    batches = [(torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))) for _ in range(2)]
    return model, batches


def groups_of(model, example, ignored=()):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    return DG, list(DG.get_all_groups(ignored_layers=list(ignored),
                                      root_module_types=[nn.Conv2d, nn.Linear]))


def member_kind(DG, dep):
    """'in', 'out' or 'both' (depthwise) for a Conv2d/Linear member, else None."""
    if not isinstance(dep.layer, (nn.Conv2d, nn.Linear)):
        return None
    reads = DG.is_in_channel_pruning_fn(dep.pruning_fn)
    writes = DG.is_out_channel_pruning_fn(dep.pruning_fn)
    return "both" if reads and writes else ("in" if reads else "out")


def weight_4d(layer):
    w = layer.weight.detach().double()
    return w if w.dim() == 4 else w[:, :, None, None]


def ref_in_channel(layer, c, A_blocks, S_blocks, quad):
    """Σ over kernel offsets of ``quad(col, A_g, S_g, j)`` for input channel c."""
    w = weight_4d(layer)
    G = getattr(layer, "groups", 1)
    d_in, d_out = w.shape[1], w.shape[0] // G
    g, j = c // d_in, c % d_in
    A, S = A_blocks[g].double(), S_blocks[g].double()
    total = 0.0
    for u in range(w.shape[2]):
        for v in range(w.shape[3]):
            col = w[g * d_out:(g + 1) * d_out, j, u, v]
            total += quad(col, A, S, j)
    return total


def ref_out_channel(layer, c, A_blocks, S_blocks, quad):
    w = weight_4d(layer)
    G = getattr(layer, "groups", 1)
    d_out = w.shape[0] // G
    g, i = c // d_out, c % d_out
    A, S = A_blocks[g].double(), S_blocks[g].double()
    total = 0.0
    for u in range(w.shape[2]):
        for v in range(w.shape[3]):
            total += quad(w[c, :, u, v], S, A, i)
    return total


def mean_data_grads(model, batches):
    """``Ḡ = (1/N) Σ_n ∂ℓ_n(y_n)/∂W`` of every Conv2d / Linear by plain autograd (float64 sums),
    the reference for the first-order term."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = {m: torch.zeros_like(m.weight, dtype=torch.float64) for m in layers}
    count = 0
    for x, y in batches:
        loss = F.cross_entropy(model(x), y, reduction="sum")
        for m, g in zip(layers, torch.autograd.grad(loss, [m.weight for m in layers])):
            total[m] += g.double()
        count += len(y)
    return {m: t / count for m, t in total.items()}


def first_order_ref(layer, use, c, grads):
    """``−Σ Ḡ ⊙ w`` over the weights of input (``use="in"``) or output channel c of ``layer``."""
    w, g = weight_4d(layer), grads[layer].reshape(weight_4d(layer).shape)
    if use == "out":
        return -(w[c] * g[c]).sum().item()
    G = getattr(layer, "groups", 1)
    d_in, d_out = w.shape[1], w.shape[0] // G
    rows = slice((c // d_in) * d_out, (c // d_in + 1) * d_out)
    return -(w[rows, c % d_in] * g[rows, c % d_in]).sum().item()


def kron_obd_quad(vec, diag_of, metric, index):
    """½ · diag_of[index, index] · vecᵀ metric vec (Kron-OBD, either side)."""
    return 0.5 * diag_of[index, index].item() * (vec @ metric @ vec).item()


def group_reference(DG, group, member_score, side):
    """Sum of ``member_score(layer, kind_used, channel)`` over the group's members on ``side``,
    indexed like the group's root channels."""
    position = {r: p for p, r in enumerate(group[0].root_idxs)}
    ref = torch.zeros(len(position), dtype=torch.float64)
    for item in group:
        kind = member_kind(DG, item.dep)
        if kind is None:
            continue
        use = "in" if side == "consumer" else "out"
        if kind not in ((use,) if side == "consumer" else (use, "both")):   # depthwise: producer only
            continue
        for r, i in zip(item.root_idxs, item.idxs):
            ref[position[r]] += member_score(item.dep.layer, use, i)
    return ref
