"""SwAV, MoCo v3, NNCLR and I-JEPA: each loss against a naive implementation of its paper's pseudo-code (explicit
Python loops over samples and dimensions, float64), then construction, paper defaults, view specs and the
method-specific mechanics (SwAV's prototype freeze and queue, NNCLR's support set, I-JEPA's masks and encoder
check). Unit-sized: tiny encoders and heads, CPU, well under a second each."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_methods import TinyEncoder
from torch import nn

from sslrun.core.config import coerce_dataclass
from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, SetupContext
from sslrun.plugins.encoders.vit import vit_tiny
from sslrun.plugins.methods.ijepa import IJEPA, IJEPAConfig, ijepa_loss
from sslrun.plugins.methods.ijepa_masks import block_size, sample_block_masks
from sslrun.plugins.methods.mocov3 import MoCoV3, MoCoV3Config, mocov3_contrastive_loss
from sslrun.plugins.methods.nnclr import NNCLR, NNCLRConfig, nearest_neighbour, nnclr_loss
from sslrun.plugins.methods.swav import SwAV, SwAVConfig, sinkhorn, swav_loss

TOL = 1e-5


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    dot = sum(float(a[i]) * float(b[i]) for i in range(a.shape[0]))
    na = math.sqrt(sum(float(a[i]) ** 2 for i in range(a.shape[0])))
    nb = math.sqrt(sum(float(b[i]) ** 2 for i in range(b.shape[0])))
    return dot / (na * nb)


def tiny_vit() -> nn.Module:
    return vit_tiny(image_size=16, patch_size=4, depth=1)


SMALL: dict[type[Method], dict[str, Any]] = {
    SwAV: {"hidden_dim": 32, "output_dim": 8, "num_prototypes": 10, "queue_length": 16},
    MoCoV3: {"hidden_dim": 32, "output_dim": 8},
    NNCLR: {"projection_hidden_dim": 32, "projection_dim": 8, "prediction_hidden_dim": 32, "queue_size": 16},
    IJEPA: {"predictor_depth": 1, "min_keep": 2},
}


def build(cls: type[Method], encoder: nn.Module | None = None, **overrides: Any) -> Method:
    encoder = encoder or (tiny_vit() if cls is IJEPA else TinyEncoder())
    return cls(encoder, cls.Config(**{**SMALL[cls], **overrides}))


def views_for(method: Method, batch: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s.size, s.size, generator=g) for s in type(method).view_specs(method.cfg, size)]


# ---- SwAV: Sinkhorn-Knopp and the swapped prediction ---------------------------------------------------------------
def naive_sinkhorn(scores: torch.Tensor, eps: float, niters: int) -> list[list[float]]:
    """The Sinkhorn-Knopp of the paper's pseudo-code (algorithm 1), loop by loop: Q = exp(scores / eps)^T,
    Q /= sum(Q), then ``niters`` times rows scaled to r = 1/K and columns to c = 1/B; finally each column normalised
    to sum to 1. Returns codes[b][k]."""
    b_n, k_n = scores.shape
    q = [[math.exp(float(scores[b, k]) / eps) for b in range(b_n)] for k in range(k_n)]  # K x B
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(niters):
        for k in range(k_n):
            u = sum(q[k])
            q[k] = [v * (1 / k_n) / u for v in q[k]]
        for b in range(b_n):
            col = sum(q[k][b] for k in range(k_n))
            for k in range(k_n):
                q[k][b] *= (1 / b_n) / col
    cols = [sum(q[k][b] for k in range(k_n)) for b in range(b_n)]
    return [[q[k][b] / cols[b] for k in range(k_n)] for b in range(b_n)]


def naive_swav_loss(scores: list[torch.Tensor], codes: list[list[list[float]]], tau: float) -> float:
    """Eq. 1-2 with multi-crop: for every coded view i and every other view v, the cross entropy between q_i and
    softmax(z_v . c / tau), averaged over the batch, over the other views, then over the coded views."""
    total = 0.0
    for i, q in enumerate(codes):
        sub = 0.0
        others = [v for v in range(len(scores)) if v != i]
        for v in others:
            s = scores[v]
            for b in range(s.shape[0]):
                logz = math.log(sum(math.exp(float(s[b, k]) / tau) for k in range(s.shape[1])))
                sub -= sum(q[b][k] * (float(s[b, k]) / tau - logz) for k in range(s.shape[1])) / s.shape[0]
        total += sub / len(others)
    return total / len(codes)


def test_sinkhorn_matches_the_papers_algorithm() -> None:
    scores = F.normalize(_randn(6, 5, seed=0), dim=1) * 0.9  # cosine-like scores
    ours = sinkhorn(scores, epsilon=0.05, iterations=3)
    ref = torch.tensor(naive_sinkhorn(scores, 0.05, 3), dtype=torch.float64)
    assert torch.allclose(ours, ref, atol=TOL, rtol=0)
    assert torch.allclose(ours.sum(dim=1), torch.ones(6, dtype=torch.float64))
    # equipartition: with more iterations the prototypes share the samples equally
    many = sinkhorn(scores, epsilon=0.05, iterations=200)
    assert torch.allclose(many.sum(dim=0), torch.full((5,), 6 / 5, dtype=torch.float64), atol=1e-3)


def test_sinkhorn_counts_shared_rows_once_and_survives_tiny_epsilon() -> None:
    scores = _randn(7, 4, seed=1)
    assert torch.allclose(sinkhorn(scores, 0.05, 3, shared_rows=3), sinkhorn(scores, 0.05, 3))  # one process
    cosines = F.normalize(scores, dim=1) @ F.normalize(_randn(4, 4, seed=2), dim=1).T
    codes = sinkhorn(cosines.float(), epsilon=0.004, iterations=3)  # exp(1 / 0.004) overflows float32
    assert torch.isfinite(codes).all() and codes.dtype == torch.float32


def test_swav_loss_matches_the_papers_swapped_prediction() -> None:
    scores = [F.normalize(_randn(4, 5, seed=10 + v), dim=1) for v in range(4)]  # 2 global + 2 local views
    codes_ref = [naive_sinkhorn(scores[i], 0.05, 3) for i in range(2)]
    codes = [sinkhorn(scores[i], 0.05, 3) for i in range(2)]
    ours = float(swav_loss(scores, codes, temperature=0.1))
    assert ours == pytest.approx(naive_swav_loss(scores, codes_ref, 0.1), abs=TOL)


def test_swav_freezes_prototypes_for_the_first_epoch_and_normalises_them() -> None:
    torch.manual_seed(0)
    method = build(SwAV, queue_length=0)
    method.setup(SetupContext(image_size=28, steps_per_epoch=2, total_steps=10))
    assert method.freeze_steps == 2
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    grads = []
    for step in range(3):
        out = method(views_for(method, 4, 28, seed=step))
        norms = method.prototypes.weight.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
        opt.zero_grad()
        out["loss"].backward()
        grads.append(float(method.prototypes.weight.grad.abs().sum()))
        assert float(method.projector[0].weight.grad.abs().sum()) > 0
        opt.step()
        method.on_after_step(step, None)
    assert grads[0] == grads[1] == 0.0 and grads[2] > 0
    resumed = build(SwAV, queue_length=0)
    resumed.load_state_dict(method.state_dict())
    assert resumed._step == 3 and int(resumed.step_count) == 3


def test_swav_queue_fills_from_its_start_then_joins_the_sinkhorn_problem() -> None:
    torch.manual_seed(0)
    method = build(SwAV, queue_length=18, queue_start_steps=1)  # 18 rounds down to 16 rows at batch 8
    method.setup(SetupContext(image_size=28, steps_per_epoch=4, total_steps=10))
    used = []
    for step in range(5):
        views = views_for(method, 8, 28, seed=step)
        used.append(float(method(views)["queue_used"]))
        method.on_after_step(step, None)
    assert used == [0.0, 0.0, 0.0, 1.0, 1.0]  # step 0: not started; steps 1, 2 fill 16 rows; then used
    assert int(method.queue_fill) == 16
    assert float(method.queue[:, :16].norm(dim=2).min()) == pytest.approx(1.0)  # unit embeddings
    assert float(method.queue[:, 16:].abs().sum()) == 0.0  # rows beyond the multiple of the batch stay unused
    big = build(SwAV, queue_length=3840, queue_start_steps=0)
    big(views_for(big, 8, 28))
    assert int(big.queue_fill) == 8
    too_big_batch = build(SwAV, queue_length=3840, queue_start_steps=0, num_local_crops=0)
    too_big_batch([torch.randn(257, 3, 8, 8), torch.randn(257, 3, 8, 8)])
    assert int(too_big_batch.queue_fill) == 0  # the paper uses the queue for small batches only


def test_swav_views_defaults_and_config_errors() -> None:
    cfg = SwAVConfig()
    assert (cfg.epsilon, cfg.sinkhorn_iterations, cfg.temperature, cfg.num_prototypes) == (0.05, 3, 0.1, 3000)
    assert (cfg.freeze_prototypes_epochs, cfg.queue_length, cfg.queue_start_epochs) == (1.0, 3840, 15.0)
    small = SwAV.view_specs(cfg, 28)
    assert [s.size for s in small] == [28, 28, 12, 12, 12, 12]
    assert all(s.blur_p == 0 for s in small) and small[0].scale == (0.2, 1.0) and small[2].scale == (0.05, 0.14)
    big = SwAV.view_specs(cfg, 224)
    assert [s.size for s in big] == [224] * 2 + [96] * 6 and big[0].scale == (0.14, 1.0) and big[0].blur_p == 0.5
    for bad in ({"epsilon": 0}, {"sinkhorn_iterations": 0}, {"local_crops_scale": [0.5, 0.1]}, {"queue_length": -1}):
        with pytest.raises(ConfigError, match="swav") as exc:
            coerce_dataclass(SwAVConfig, bad, "method.kwargs (swav)")
        assert "\n" not in str(exc.value)


# ---- MoCo v3 ----------------------------------------------------------------------------------------------------
def naive_ctr(q: torch.Tensor, k: torch.Tensor, tau: float) -> float:
    """Algorithm 1's ``ctr``: cross entropy of q_i against all keys k_j (cosines / tau), label i, times 2 tau."""
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        logits = [_cos(q[i], k[j]) / tau for j in range(n)]
        total -= logits[i] - math.log(sum(math.exp(v) for v in logits))
    return total / n * 2 * tau


def test_mocov3_loss_matches_the_papers_pseudo_code() -> None:
    q1, q2, k1, k2 = (_randn(5, 4, seed=s) for s in range(20, 24))
    ours = float(mocov3_contrastive_loss(q1, k2, 0.2) + mocov3_contrastive_loss(q2, k1, 0.2))
    assert ours == pytest.approx(naive_ctr(q1, k2, 0.2) + naive_ctr(q2, k1, 0.2), abs=TOL)


def test_mocov3_heads_momentum_and_random_patch_projection() -> None:
    cfg = MoCoV3Config()
    assert (cfg.temperature, cfg.momentum, cfg.momentum_final, cfg.hidden_dim, cfg.output_dim) == (
        0.2,
        0.99,
        1.0,
        4096,
        256,
    )
    assert MoCoV3.optim_defaults["name"] == "lars"
    cnn = build(MoCoV3)
    assert sum(isinstance(m, nn.Linear) for m in cnn.projector) == 2
    assert isinstance(cnn.projector[-1], nn.BatchNorm1d) and not cnn.projector[-1].affine
    assert not isinstance(cnn.predictor[-1], nn.BatchNorm1d)
    assert all(not p.requires_grad for p in cnn.momentum_encoder.parameters())
    vit = build(MoCoV3, tiny_vit(), stop_grad_conv1=True)
    assert sum(isinstance(m, nn.Linear) for m in vit.projector) == 3 and isinstance(vit.predictor[-1], nn.BatchNorm1d)
    assert not any(p.requires_grad for p in vit.encoder.patch_embed.parameters())
    assert all(p.requires_grad for p in vit.encoder.blocks.parameters())
    with pytest.raises(ConfigError, match="stop_grad_conv1 needs a ViT"):
        build(MoCoV3, stop_grad_conv1=True)
    with pytest.raises(ConfigError, match="mocov3"):
        coerce_dataclass(MoCoV3Config, {"temperature": 0}, "method.kwargs (mocov3)")


# ---- NNCLR ------------------------------------------------------------------------------------------------------
def naive_nnclr(z1: torch.Tensor, z2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, q: torch.Tensor, tau: float):
    """Algorithm 1: nn = the support row with the highest cosine to z; L(nn, p) = cross entropy of nn_i . p_j / tau
    over j (unit vectors), label i; loss = L(nn1, p2) / 2 + L(nn2, p1) / 2."""

    def nn_of(z: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i in range(z.shape[0]):
            j = max(range(q.shape[0]), key=lambda j: _cos(z[i], q[j]))
            out.append(q[j] / math.sqrt(sum(float(v) ** 2 for v in q[j])))
        return out

    def ell(nn_rows: list[torch.Tensor], p: torch.Tensor) -> float:
        n = p.shape[0]
        total = 0.0
        for i in range(n):
            logits = [_cos(nn_rows[i], p[j]) / tau for j in range(n)]
            total -= logits[i] - math.log(sum(math.exp(v) for v in logits))
        return total / n

    return ell(nn_of(z1), p2) / 2 + ell(nn_of(z2), p1) / 2


def test_nnclr_loss_matches_the_papers_pseudo_code() -> None:
    z1, z2, p1, p2 = (_randn(5, 4, seed=s) for s in range(30, 34))
    support = _randn(9, 4, seed=34)
    nn1, nn2 = nearest_neighbour(z1, support), nearest_neighbour(z2, support)
    ours = float(nnclr_loss(nn1, p2, 0.1) / 2 + nnclr_loss(nn2, p1, 0.1) / 2)
    assert ours == pytest.approx(naive_nnclr(z1, z2, p1, p2, support, 0.1), abs=TOL)


def test_nnclr_support_set_takes_the_first_views_projections_with_wrap_around() -> None:
    cfg = NNCLRConfig()
    assert (cfg.temperature, cfg.projection_dim, cfg.projection_hidden_dim, cfg.prediction_hidden_dim) == (
        0.1,
        256,
        2048,
        4096,
    )
    torch.manual_seed(0)
    method = build(NNCLR, queue_size=12)
    method.eval()  # BatchNorm with running statistics: the projections below are the forward's
    views = views_for(method, 8, 28)
    out = method(views)
    assert 0.0 <= float(out["nn_agree"]) <= 1.0 and int(method.queue_ptr) == 8
    z1 = F.normalize(method.projector(method.encoder(views[0])), dim=1)
    assert torch.allclose(method.queue[:8], z1.detach(), atol=1e-6)
    method(views_for(method, 8, 28, seed=1))
    assert int(method.queue_ptr) == 4  # (8 + 8) % 12
    too_small = build(NNCLR, queue_size=4)
    with pytest.raises(ConfigError, match="queue_size 4 is smaller than the global batch 8"):
        too_small(views_for(too_small, 8, 28))


# ---- I-JEPA -----------------------------------------------------------------------------------------------------
def naive_ijepa_loss(pred: torch.Tensor, h: torch.Tensor, kind: str) -> float:
    """The paper's loss on layer-normed targets (LayerNorm without affine, eps 1e-5), averaged over blocks, patches and
    dimensions: squared L2 (the paper) or Huber with beta 1 (the official code)."""
    total, count = 0.0, 0
    for r in range(pred.shape[0]):
        for t in range(pred.shape[1]):
            row = [float(v) for v in h[r, t]]
            mean = sum(row) / len(row)
            var = sum((v - mean) ** 2 for v in row) / len(row)
            for d, v in enumerate(row):
                diff = float(pred[r, t, d]) - (v - mean) / math.sqrt(var + 1e-5)
                total += diff**2 if kind == "l2" else (0.5 * diff**2 if abs(diff) < 1 else abs(diff) - 0.5)
                count += 1
    return total / count


@pytest.mark.parametrize("kind", ["l2", "smooth_l1"])
def test_ijepa_loss_matches_the_papers_equation(kind: str) -> None:
    pred, h = _randn(3, 4, 6, seed=40), _randn(3, 4, 6, seed=41) * 3
    ours = float(ijepa_loss(pred, F.layer_norm(h, (6,)), kind))
    assert ours == pytest.approx(naive_ijepa_loss(pred, h, kind), abs=TOL)


def test_ijepa_forward_predicts_each_target_block_of_each_sample() -> None:
    """The method's loss, re-derived block by block and sample by sample from its own parts."""
    torch.manual_seed(0)
    method = build(IJEPA).double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    loss = float(method([x])["loss"].detach())
    masks = method.masks(3, 4, 4, x.device)
    enc, tgt = method.encoder, method.target_encoder
    z = torch.stack([enc.forward_tokens(enc.patch_tokens(x[i : i + 1])[:, masks.context[i]])[0, 1:] for i in range(3)])
    pred = method.predictor(z, masks, 4, 4)
    h = F.layer_norm(tgt.forward_tokens(tgt.patch_tokens(x))[:, 1:], (192,))
    m = masks.targets.shape[0]
    errors = [
        ((pred[k * 3 + i] - h[i, masks.targets[k, i]]) ** 2).mean() for k in range(m) for i in range(3)
    ]  # every block has as many patches, so the mean of means is the mean
    assert loss == pytest.approx(float(torch.stack(errors).mean().detach()), abs=TOL)


def test_ijepa_masks_follow_the_paper() -> None:
    for seed in range(5):
        masks = sample_block_masks(16, 14, 14, torch.Generator().manual_seed(seed))
        m, n, lt = masks.targets.shape
        assert (m, n) == (4, 16) and 0.1 * 196 <= lt <= 0.25 * 196  # scale 0.15-0.2 after rounding
        assert masks.context.shape[0] == 16 and masks.context.shape[1] > 10
        for i in range(n):
            ctx = set(masks.context[i].tolist())
            assert masks.context[i].tolist() == sorted(ctx)
            for k in range(m):
                assert not ctx & set(masks.targets[k, i].tolist()), "context and targets must not overlap"
    again = sample_block_masks(16, 14, 14, torch.Generator().manual_seed(4))
    assert torch.equal(again.context, masks.context) and torch.equal(again.targets, masks.targets)
    assert block_size(0.0, 14, 14, (0.85, 1.0), (1.0, 1.0)) == (13, 13)  # capped at the grid side minus one
    assert block_size(1.0, 14, 14, (0.15, 0.2), (0.75, 1.5)) == (8, 5)  # 39 patches at aspect h/w 1.5
    tiny = sample_block_masks(4, 3, 3, torch.Generator().manual_seed(0))  # no valid context at all: relaxed
    assert tiny.context.shape[1] >= 1


def test_ijepa_masks_are_keyed_by_step_and_survive_a_checkpoint() -> None:
    torch.manual_seed(0)
    a = build(IJEPA)
    first = a.masks(4, 4, 4, torch.device("cpu"))
    a.on_after_step(0, 0.996)
    second = a.masks(4, 4, 4, torch.device("cpu"))
    torch.manual_seed(1)
    b = build(IJEPA)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.masks(4, 4, 4, torch.device("cpu")).context, second.context)
    assert not torch.equal(first.targets, second.targets) or not torch.equal(first.context, second.context)


def test_ijepa_refuses_non_vit_encoders_even_on_the_meta_device() -> None:
    cfg = IJEPAConfig()
    assert (cfg.num_targets, cfg.target_scale, cfg.target_aspect, cfg.context_scale) == (
        4,
        (0.15, 0.2),
        (0.75, 1.5),
        (0.85, 1.0),
    )
    assert (cfg.momentum, cfg.momentum_final, cfg.loss) == (0.996, 1.0, "l2")
    with torch.device("meta"):
        with pytest.raises(ConfigError, match="ijepa needs a ViT encoder") as exc:
            IJEPA(TinyEncoder(), cfg)
        assert "\n" not in str(exc.value)
        IJEPA(tiny_vit(), cfg)  # builds without touching data
    with pytest.raises(ConfigError, match="predictor width 90 must be divisible"):
        build(IJEPA, predictor_dim=90, predictor_heads=4)
    specs = IJEPA.view_specs(cfg, 28)
    assert len(specs) == 1 and specs[0].scale == (0.3, 1.0) and specs[0].flip_p == 0 and specs[0].jitter_p == 0
    for bad in ({"loss": "l1"}, {"target_scale": [0.3, 0.2]}, {"momentum": 2.0}):
        with pytest.raises(ConfigError, match="ijepa"):
            coerce_dataclass(IJEPAConfig, bad, "method.kwargs (ijepa)")


# ---- all four: one training step --------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [SwAV, MoCoV3, NNCLR, IJEPA], ids=lambda c: c.__name__)
def test_one_training_step(cls: type[Method]) -> None:
    torch.manual_seed(0)
    method = build(cls)
    method.train()
    size = 16 if cls is IJEPA else 28
    out = method(views_for(method, 8, size))
    for key, value in out.items():
        assert value.ndim == 0 and torch.isfinite(value), key
        assert key == "loss" or not value.requires_grad, key
    out["loss"].backward()
    for name, p in method.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    grouped = [p for g in method.param_groups() for p in g["params"]]
    assert {id(p) for p in grouped} == {id(p) for p in method.parameters() if p.requires_grad}
    sched = method.momentum_schedule()
    if sched is not None:
        teacher = {n: p.clone() for n, p in method.named_parameters() if not p.requires_grad}
        torch.optim.SGD(grouped, lr=0.1).step()
        method.on_after_step(0, sched[0])
        assert any(not torch.equal(p, teacher[n]) for n, p in method.named_parameters() if not p.requires_grad)
