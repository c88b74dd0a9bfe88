"""The SSL losses against naive re-implementations of each paper's formula, written with explicit Python loops
over samples and dimensions (independent of the vectorised code), on fixed float64 inputs; plus "the loss goes
down" on a fixed batch with a tiny model, and the float32-under-autocast rule."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslrun.plugins.common.losses import (
    DINOLoss,
    barlow_twins_loss,
    byol_loss,
    info_nce_loss,
    negative_cosine_similarity,
    nt_xent_loss,
    off_diagonal,
    vicreg_loss,
)

TOL = 1e-5


def _randn(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ---- naive references (paper equations, loops) ---------------------------------------------------------------
def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(a[i]) * float(b[i]) for i in range(a.shape[0]))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return _dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b))


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR eq. 1: the 2N embeddings interleaved as (2k-1, 2k) pairs; mean of l(i, j) + l(j, i) over pairs."""
    n = z1.shape[0]
    z = [z1[k // 2] if k % 2 == 0 else z2[k // 2] for k in range(2 * n)]  # z_{2k}, z_{2k+1} are one image's views

    def ell(i: int, j: int) -> float:
        num = math.exp(_cos(z[i], z[j]) / t)
        den = sum(math.exp(_cos(z[i], z[k]) / t) for k in range(2 * n) if k != i)
        return -math.log(num / den)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


def naive_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(_cos(q[i], k[i]) / t)
        neg = sum(math.exp(_cos(q[i], queue[j]) / t) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def naive_byol(p: torch.Tensor, z: torch.Tensor) -> float:
    total = 0.0
    for i in range(p.shape[0]):
        pn, zn = math.sqrt(_dot(p[i], p[i])), math.sqrt(_dot(z[i], z[i]))
        total += sum((float(p[i, d]) / pn - float(z[i, d]) / zn) ** 2 for d in range(p.shape[1]))
    return total / p.shape[0]


def _bn_columns(z: torch.Tensor, eps: float) -> list[list[float]]:
    """Per-dimension standardisation with the biased variance (BatchNorm1d in training mode)."""
    n, d = z.shape
    out = [[0.0] * d for _ in range(n)]
    for j in range(d):
        col = [float(z[b, j]) for b in range(n)]
        mean = sum(col) / n
        var = sum((c - mean) ** 2 for c in col) / n
        for b in range(n):
            out[b][j] = (col[b] - mean) / math.sqrt(var + eps)
    return out


def naive_barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5) -> float:
    n, d = z1.shape
    a, b = _bn_columns(z1, eps), _bn_columns(z2, eps)
    c = [[sum(a[s][i] * b[s][j] for s in range(n)) / n for j in range(d)] for i in range(d)]
    inv = sum((1 - c[i][i]) ** 2 for i in range(d))
    red = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return inv + lambd * red


def naive_vicreg(x: torch.Tensor, y: torch.Tensor, lam: float, mu: float, nu: float, eps: float = 1e-4) -> float:
    n, d = x.shape
    inv = sum((float(x[b, j]) - float(y[b, j])) ** 2 for b in range(n) for j in range(d)) / (n * d)

    def var_cov(z: torch.Tensor) -> tuple[float, float]:
        means = [sum(float(z[b, j]) for b in range(n)) / n for j in range(d)]
        cov = [
            [
                sum((float(z[b, i]) - means[i]) * (float(z[b, j]) - means[j]) for b in range(n)) / (n - 1)
                for j in range(d)
            ]
            for i in range(d)
        ]
        v = sum(max(0.0, 1 - math.sqrt(cov[j][j] + eps)) for j in range(d)) / d
        c = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return v, c

    vx, cx = var_cov(x)
    vy, cy = var_cov(y)
    return lam * inv + mu * (vx + vy) / 2 + nu * (cx + cy)


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def naive_dino(
    student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, tt: float, ts: float
) -> float:
    total, pairs = 0.0, 0
    for iq, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == iq:
                continue
            per_row = 0.0
            for b in range(t.shape[0]):
                p_t = _softmax([(float(t[b, k]) - float(center[0, k])) / tt for k in range(t.shape[1])])
                p_s = _softmax([float(s[b, k]) / ts for k in range(s.shape[1])])
                per_row += -sum(p_t[k] * math.log(p_s[k]) for k in range(t.shape[1]))
            total += per_row / t.shape[0]
            pairs += 1
    return total / pairs


# ---- value checks --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.5, 0.1])
def test_nt_xent_matches_paper_formula(t: float) -> None:
    z1, z2 = _randn(6, 5, seed=1), _randn(6, 5, seed=2)
    assert float(nt_xent_loss(z1, z2, t)) == pytest.approx(naive_nt_xent(z1, z2, t), abs=TOL)


def test_nt_xent_is_symmetric_in_views_and_scale_invariant() -> None:
    z1, z2 = _randn(5, 4, seed=3), _randn(5, 4, seed=4)
    assert float(nt_xent_loss(z1, z2)) == pytest.approx(float(nt_xent_loss(z2, z1)), abs=1e-12)
    assert float(nt_xent_loss(3 * z1, z2)) == pytest.approx(float(nt_xent_loss(z1, z2)), abs=1e-12)


def test_info_nce_matches_moco_formula() -> None:
    q, k = _randn(5, 4, seed=5), _randn(5, 4, seed=6)
    queue = F.normalize(_randn(7, 4, seed=7), dim=1)
    assert float(info_nce_loss(q, k, queue, 0.2)) == pytest.approx(naive_info_nce(q, k, queue, 0.2), abs=TOL)


def test_byol_and_simsiam_losses_match_formulas() -> None:
    p, z = _randn(6, 5, seed=8), _randn(6, 5, seed=9)
    assert float(byol_loss(p, z)) == pytest.approx(naive_byol(p, z), abs=TOL)
    naive_neg_cos = -sum(_cos(p[i], z[i]) for i in range(6)) / 6
    assert float(negative_cosine_similarity(p, z)) == pytest.approx(naive_neg_cos, abs=TOL)


def test_stop_gradient_on_targets() -> None:
    p = _randn(4, 3, seed=10).requires_grad_()
    z = _randn(4, 3, seed=11).requires_grad_()
    (byol_loss(p, z) + negative_cosine_similarity(p, z)).backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("lambd", [5e-3, 0.5])
def test_barlow_twins_matches_paper_formula(lambd: float) -> None:
    z1, z2 = _randn(8, 4, seed=12), _randn(8, 4, seed=13)
    loss, terms = barlow_twins_loss(z1, z2, lambd)
    assert float(loss) == pytest.approx(naive_barlow_twins(z1, z2, lambd), abs=TOL)
    assert float(terms["loss_inv"] + terms["loss_red"]) == pytest.approx(float(loss), abs=1e-12)
    assert not terms["loss_inv"].requires_grad


def test_vicreg_matches_paper_formula() -> None:
    x, y = 0.3 * _randn(9, 4, seed=14), 0.3 * _randn(9, 4, seed=15)  # std < 1: the variance hinge is active
    loss, terms = vicreg_loss(x, y, 25.0, 25.0, 1.0)
    assert float(loss) == pytest.approx(naive_vicreg(x, y, 25.0, 25.0, 1.0), abs=TOL)
    assert float(terms["loss_var"]) > 0
    recombined = 25 * terms["loss_inv"] + 25 * terms["loss_var"] + terms["loss_cov"]
    assert float(recombined) == pytest.approx(float(loss), abs=1e-9)


def test_dino_loss_matches_formula_and_updates_center() -> None:
    student = [_randn(5, 6, seed=20 + i) for i in range(4)]  # 2 global + 2 local views
    teacher = [_randn(5, 6, seed=30 + i) for i in range(2)]
    crit = DINOLoss(6, student_temp=0.1, center_momentum=0.9).double()
    crit.center.copy_(_randn(1, 6, seed=40))
    old_center = crit.center.clone()
    loss = crit(student, teacher, teacher_temp=0.04)
    assert float(loss) == pytest.approx(naive_dino(student, teacher, old_center, 0.04, 0.1), abs=TOL)
    # c <- m c + (1 - m) * mean over every teacher row of both global views
    for k in range(6):
        mean_k = sum(float(t[b, k]) for t in teacher for b in range(5)) / 10
        assert float(crit.center[0, k]) == pytest.approx(0.9 * float(old_center[0, k]) + 0.1 * mean_k, abs=1e-12)


def test_dino_loss_accepts_a_tensor_temperature_and_can_skip_the_update() -> None:
    student = [_randn(3, 4, seed=50 + i) for i in range(2)]
    teacher = [_randn(3, 4, seed=60 + i) for i in range(2)]
    crit = DINOLoss(4).double()
    a = crit(student, teacher, torch.tensor(0.05, dtype=torch.float64), update_center=False)
    assert torch.equal(crit.center, torch.zeros(1, 4, dtype=torch.float64))
    assert float(a) == pytest.approx(naive_dino(student, teacher, crit.center, 0.05, 0.1), abs=TOL)


def test_off_diagonal() -> None:
    m = torch.arange(16.0).view(4, 4)
    expected = [float(m[i, j]) for i in range(4) for j in range(4) if i != j]
    assert off_diagonal(m).tolist() == expected


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="one shape"):
        nt_xent_loss(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        barlow_twins_loss(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="two views"):
        DINOLoss(3)([torch.zeros(2, 3)], [torch.zeros(2, 3)], 0.04)


def test_losses_compute_in_float32_under_autocast() -> None:
    z1, z2 = _randn(6, 8, seed=70).float(), _randn(6, 8, seed=71).float()
    ref = nt_xent_loss(z1, z2, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nt_xent_loss(z1.bfloat16(), z2.bfloat16(), 0.1)
        bt, _ = barlow_twins_loss(z1.bfloat16(), z2.bfloat16())
    assert out.dtype == torch.float32 and bt.dtype == torch.float32
    assert float(out) == pytest.approx(float(ref), abs=0.05)  # only the bf16 rounding of the inputs differs


# ---- the loss goes down on a fixed batch ---------------------------------------------------------------------
def _two_views(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = _randn(16, 10, seed=seed).float()
    return x, x + 0.3 * _randn(16, 10, seed=seed + 1).float()


def _descend(loss_fn: Callable[[nn.Module], torch.Tensor], steps: int = 30, lr: float = 0.05) -> tuple[float, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = last = 0.0
    for i in range(steps):
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 0:
            first = float(loss.detach())
        last = float(loss.detach())
    return first, last


X1, X2 = _two_views(100)
QUEUE = F.normalize(_randn(32, 8, seed=102).float(), dim=1)
TARGET = _randn(16, 8, seed=103).float()
TEACHER = [_randn(16, 8, seed=104).float(), _randn(16, 8, seed=105).float()]

DESCENT_CASES = {
    "nt_xent": lambda m: nt_xent_loss(m(X1), m(X2), 0.5),
    "info_nce": lambda m: info_nce_loss(m(X1), m(X2).detach(), QUEUE, 0.2),
    "byol": lambda m: byol_loss(m(X1), TARGET),
    "simsiam": lambda m: negative_cosine_similarity(m(X1), TARGET),
    "barlow_twins": lambda m: barlow_twins_loss(m(X1), m(X2), 5e-3)[0],
    "vicreg": lambda m: vicreg_loss(m(X1), m(X2))[0],
    "dino": lambda m: DINOLoss(8)([m(X1), m(X2)], TEACHER, 0.04, update_center=False),
}


@pytest.mark.parametrize("name", sorted(DESCENT_CASES))
def test_loss_decreases_on_a_fixed_batch(name: str) -> None:
    first, last = _descend(DESCENT_CASES[name])
    assert math.isfinite(last)
    assert last < first - 1e-3, f"{name}: {first:.4f} -> {last:.4f}"
