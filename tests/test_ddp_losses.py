"""Under DDP, every method gives the same loss AND gradients as one process on the concatenated batch.

Two gloo processes (``torch.multiprocessing.spawn``, loopback only) each take half of a fixed global batch, wrap
the method in real ``DistributedDataParallel`` and run two optimiser steps (forward, backward, SGD step,
``on_after_step``); the parent runs the same two steps in one process on the whole batch. Compared:

* the mean over ranks of the per-rank losses vs the one-process loss, at both steps (so the DINO centre, the
  MoCo queue and the EMA teachers written by step 1 are exercised by step 2);
* the DDP-averaged gradients of every trainable parameter, at both steps;
* the whole ``state_dict`` after the second ``on_after_step`` (teachers, queue, centre, step counters).

This is what makes SimCLR's cross-rank negatives, Barlow Twins' and VICReg's global-batch statistics, DINO's
all-reduced centre, MoCo v2's gathered queue / shuffled keys, MoCo v3's keys gathered with rank-offset labels,
NNCLR's gathered predictions and support set, SwAV's Sinkhorn over the global batch (all-reduced sums) with its
prototype freeze (step 0) and queue (filled at step 0, part of the Sinkhorn problem at step 1), and I-JEPA's masks
drawn once for the global batch and split by rank provably right. The model has no BatchNorm in the
encoder and the heads' BatchNorms are in eval mode: on CPU/gloo, DDP cannot use SyncBatchNorm (it only works with
GPU modules), so per-rank batch statistics would otherwise differ legitimately. float64 everywhere, so 1e-5
tolerances test logic, not rounding. Every method runs inside ONE spawned job so the process start-up is paid once.

BatchNorm in training mode and the pretext tasks are checked in the same job against what DDP must compute when
statistics and randomness are per rank: BYOL and SimSiam on small_cnn (BatchNorm in the encoder and the heads),
rotation (small_cnn) and MAE (ViT, random masks) run in training mode, wrapped exactly as the trainer wraps them
(``ddp_wrap``), beside a plain copy on the same rank that sees the same shard and gets the mean of the ranks'
plain gradients. Equal losses, gradients and final states (BN running statistics, pretext step counters) prove
that each rank normalises its shard with its own batch statistics, keeps its own running statistics (the trainer
does not broadcast rank 0's every step), draws its own pretext randomness, and that DDP's gradient is the mean of
the per-rank gradients with every parameter used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from net import free_port
from test_methods import VIT_ONLY, TinyEncoder, build_method, make_views, momentum_now

from sslrun.core.interfaces import Method, SetupContext
from sslrun.core.plugins.registry import get_registry
from sslrun.plugins.encoders.vit import vit_tiny

pytestmark = pytest.mark.slow

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 2
TOL = 1e-5
#: Settings under which two steps reach each method's cross-rank state: SwAV's queue fills at step 0 and is full
#: (so part of Sinkhorn) at step 1; NNCLR's support set wraps around.
DDP_KWARGS: dict[str, dict[str, Any]] = {
    "swav": {"queue_length": GLOBAL_BATCH, "queue_start_steps": 0},
    "nnclr": {"queue_size": 12},
}


def _build(name: str) -> Method:
    """``name`` with small heads on a BatchNorm-free encoder (a one-block ViT where the method needs one), set up
    with one step per epoch, so epoch-based phases such as SwAV's prototype freeze cover step 0."""
    encoder = vit_tiny(image_size=28, depth=1) if name in VIT_ONLY else TinyEncoder(16)
    method = build_method(name, encoder, **DDP_KWARGS.get(name, {}))
    method.setup(SetupContext(image_size=28, steps_per_epoch=1, total_steps=STEPS))
    return method


def _run(name: str, rank: int, world: int) -> dict[str, Any]:
    """Two training steps of ``name`` on this rank's shard of the fixed global batch."""
    torch.manual_seed(0)  # identical initial weights, queue and teacher on every rank and in the reference
    method = _build(name).double()
    method.eval()  # heads' BatchNorm use running statistics: the same function on any batch split
    model: torch.nn.Module = method
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(method)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    per_rank = GLOBAL_BATCH // world
    losses, grads = [], []
    for step in range(STEPS):
        views = [v.double() for v in make_views(method, GLOBAL_BATCH, image_size=28, seed=100 + step)]
        shard = [v[rank * per_rank : (rank + 1) * per_rank] for v in views]
        out = model(shard)
        opt.zero_grad()
        out["loss"].backward()
        losses.append(float(out["loss"].detach()))
        grads.append({n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad})
        opt.step()
        method.on_after_step(step, momentum_now(method))
    state = {k: v.clone() for k, v in method.state_dict().items()}
    return {"losses": losses, "grads": grads, "state": state}


#: Run in training mode, per-rank statistics and randomness: two methods with BatchNorm everywhere, two pretext tasks.
TRAIN_MODE = ("byol", "simsiam", "rotation", "mae")


def _build_train_mode(name: str) -> Method:
    """``name`` with small heads: methods on small_cnn (BatchNorm), pretext tasks as test_pretext builds them."""
    if name in get_registry("method").names():
        return build_method(name)  # small_cnn(width=4): BatchNorm after every convolution
    from test_pretext import build

    return build(name, size=28)


def _run_train_mode(name: str, rank: int, world: int) -> dict[str, Any]:
    """Two steps of ``name`` in training mode under the trainer's DDP wrapping, and the same two steps on a plain
    copy that gets the mean over ranks of the plain copies' gradients (what DDP must compute)."""
    import copy

    from sslrun.core.train.trainer import ddp_wrap

    torch.manual_seed(0)
    method = _build_train_mode(name).double().train()
    plain = copy.deepcopy(method)
    model = ddp_wrap(method, torch.device("cpu"))
    params = [p for p in method.parameters() if p.requires_grad]
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    opt, plain_opt = torch.optim.SGD(params, lr=0.5), torch.optim.SGD(plain_params, lr=0.5)
    per_rank = GLOBAL_BATCH // world
    out: dict[str, Any] = {"losses": [], "plain_losses": [], "grads": [], "plain_grads": []}
    for step in range(STEPS):
        views = [v.double() for v in make_views(method, GLOBAL_BATCH, image_size=28, seed=100 + step)]
        shard = [v[rank * per_rank : (rank + 1) * per_rank] for v in views]
        for m, o, loss_key, grad_key, ps in (
            (model, opt, "losses", "grads", params),
            (plain, plain_opt, "plain_losses", "plain_grads", plain_params),
        ):
            loss = m(shard)["loss"]
            o.zero_grad()
            loss.backward()
            if m is plain:  # by hand what DDP does: the mean over ranks of every gradient
                for p in ps:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            out[loss_key].append(float(loss.detach()))
            out[grad_key].append([p.grad.clone() for p in ps])
            o.step()
        method.on_after_step(step, momentum_now(method))
        plain.on_after_step(step, momentum_now(plain))
    out["state"] = {k: v.clone() for k, v in method.state_dict().items()}
    out["plain_state"] = {k: v.clone() for k, v in plain.state_dict().items()}
    return out


def _worker(rank: int, world: int, port: int, out_dir: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: _run(name, rank, world) for name in names}
        results["train_mode"] = {name: _run_train_mode(name, rank, world) for name in TRAIN_MODE}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    names = get_registry("method").names()
    mp.spawn(_worker, args=(WORLD, free_port(), str(out_dir), names), nprocs=WORLD, join=True)
    return {r: torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", get_registry("method").names())
def test_ddp_matches_one_process_on_the_global_batch(name: str, ddp_results: dict[int, dict[str, Any]]) -> None:
    ref = _run(name, rank=0, world=1)
    ranks = [ddp_results[r][name] for r in range(WORLD)]
    for step in range(STEPS):
        mean_loss = sum(r["losses"][step] for r in ranks) / WORLD
        assert mean_loss == pytest.approx(ref["losses"][step], abs=TOL), f"{name}: loss at step {step}"
        for pname, g_ref in ref["grads"][step].items():
            for r in range(WORLD):
                g = ranks[r]["grads"][step][pname]
                err = float((g - g_ref).abs().max())
                assert err < TOL, f"{name}: grad of {pname} at step {step} on rank {r} differs by {err:.2e}"
    for key, v_ref in ref["state"].items():
        for r in range(WORLD):
            v = ranks[r]["state"][key]
            if v.is_floating_point():
                err = float((v - v_ref).abs().max())
                assert err < TOL, f"{name}: state {key} on rank {r} differs by {err:.2e}"
            else:
                assert torch.equal(v, v_ref), f"{name}: state {key} on rank {r}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", TRAIN_MODE)
def test_ddp_in_training_mode_is_per_rank_statistics_with_averaged_gradients(
    name: str, ddp_results: dict[int, dict[str, Any]]
) -> None:
    ranks = [ddp_results[r]["train_mode"][name] for r in range(WORLD)]
    for r, res in enumerate(ranks):
        assert res["losses"] == pytest.approx(res["plain_losses"], abs=TOL), f"{name}: losses on rank {r}"
        for step in range(STEPS):
            for i, (g, g_ref) in enumerate(zip(res["grads"][step], res["plain_grads"][step], strict=True)):
                err = float((g - g_ref).abs().max())
                assert err < TOL, f"{name}: grad {i} at step {step} on rank {r} differs by {err:.2e}"
        for key, v_ref in res["plain_state"].items():
            v = res["state"][key]
            assert torch.equal(v, v_ref) if not v.is_floating_point() else float((v - v_ref).abs().max()) < TOL, (
                f"{name}: state {key} on rank {r}"
            )
    # guard the guard: the shards really differ, so per-rank statistics are exercised
    assert ranks[0]["losses"] != pytest.approx(ranks[1]["losses"], abs=TOL), f"{name}: both ranks computed the same"
    stats = [k for k in ranks[0]["state"] if k.endswith("running_mean")]
    if name != "mae":  # the ViT has LayerNorm only
        assert stats, f"{name}: no BatchNorm to compare"
        assert any(not torch.allclose(ranks[0]["state"][k], ranks[1]["state"][k]) for k in stats)
    weights = [k for k, v in ranks[0]["state"].items() if v.is_floating_point() and "running_" not in k]
    for k in weights:  # the weights stay identical on every rank
        assert float((ranks[0]["state"][k] - ranks[1]["state"][k]).abs().max()) < TOL, f"{name}: {k} differs"


def test_cross_rank_negatives_change_the_simclr_loss() -> None:
    """Guard the guard: dropping the other rank's negatives (each half on its own) changes NT-Xent, so the equality
    above really depends on the gather."""
    from sslrun.plugins.common.losses import nt_xent_loss

    z = torch.randn(GLOBAL_BATCH, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.randn(GLOBAL_BATCH, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = float(nt_xent_loss(z, w))
    halves = sum(float(nt_xent_loss(z[i : i + 4], w[i : i + 4])) for i in (0, 4)) / 2
    assert abs(full - halves) > 1e-3


def test_the_swav_queue_and_freeze_are_exercised() -> None:
    """Guard the guard: in the set-up above SwAV's prototypes get no gradient at step 0 and its queue joins the
    Sinkhorn problem at step 1."""
    torch.manual_seed(0)
    method = _build("swav")
    used, proto_grads = [], []
    for step in range(STEPS):
        out = method(make_views(method, GLOBAL_BATCH, image_size=28, seed=100 + step))
        method.zero_grad()
        out["loss"].backward()
        used.append(float(out["queue_used"]))
        proto_grads.append(float(method.prototypes.weight.grad.abs().sum()))
        method.on_after_step(step, None)
    assert used == [0.0, 1.0]
    assert proto_grads[0] == 0.0 and proto_grads[1] > 0
