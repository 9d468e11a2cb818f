"""AdamW steps and gradient clipping on FSDP2's local shards match torch's own on full tensors, and
keep the optimizer state dict in its usual form (DTensor moments, a step count)."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from qatext import local_shards

DTensor = pytest.importorskip("torch.distributed.tensor").DTensor


@pytest.fixture
def one_rank_mesh(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_adamw_step_and_clip_match_torch(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    shapes = [(8, 4), (3,), (5, 2)]
    plain = [nn.Parameter(torch.randn(s)) for s in shapes]
    sharded = [nn.Parameter(distribute_tensor(p.detach().clone(), one_rank_mesh, [Shard(0)])) for p in plain]
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_ref, opt = torch.optim.AdamW(plain, **kwargs), torch.optim.AdamW(sharded, **kwargs)
    opt.step = None  # the local path must not fall back to the DTensor step
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(plain, sharded, grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), one_rank_mesh, [Shard(0)])
        ref_norm = torch.nn.utils.clip_grad_norm_(plain, 0.5)
        norm = local_shards.clip_grad_norm(sharded, 0.5)
        torch.testing.assert_close(norm, ref_norm)
        opt_ref.step()
        local_shards.adamw_step(opt)
    for p, q in zip(plain, sharded):
        torch.testing.assert_close(q.full_tensor(), p.detach())
        state = opt.state[q]
        assert isinstance(state["exp_avg"], DTensor) and state["step"].item() == 3
        torch.testing.assert_close(state["exp_avg_sq"].full_tensor(), opt_ref.state[p]["exp_avg_sq"])


def test_plain_tensors_take_torch_paths():
    p = nn.Parameter(torch.randn(4, 4))
    p.grad = torch.ones(4, 4)
    opt = torch.optim.AdamW([p], lr=0.1)
    before = p.detach().clone()
    assert local_shards.clip_grad_norm([p], 1.0).item() == pytest.approx(4.0)
    local_shards.adamw_step(opt)
    assert not torch.equal(p.detach(), before) and opt.state[p]["step"].item() == 1


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_clip_of_mixed_dtypes_matches_torch(device):
    """bf16 weights beside fp32 scales (a full-QAT model): the same norm and scaled gradients as torch's
    clip on float32 copies, within the bf16 rounding of the gradients and of the coefficient."""
    torch.manual_seed(0)
    specs = [((64, 32), torch.bfloat16), ((64, 2), torch.float32), ((16,), torch.bfloat16), ((64, 2), torch.float32)]
    params = [nn.Parameter(torch.randn(s, device=device, dtype=d)) for s, d in specs]
    ref = [nn.Parameter(p.detach().float()) for p in params]
    for p, r in zip(params, ref):
        p.grad = torch.randn(p.shape, device=device).to(p.dtype) * 3
        r.grad = p.grad.float().clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    norm = local_shards.clip_grad_norm(params, 1.0)
    assert norm.dtype == torch.float32 and ref_norm.item() > 10  # the clip really scales
    torch.testing.assert_close(norm, ref_norm.to(device), rtol=1e-5, atol=0)
    for p, r in zip(params, ref):
        assert p.grad.dtype == p.dtype
        tol = 1e-5 if p.dtype == torch.float32 else 8e-3  # bf16: the gradient's and the coefficient's rounding
        torch.testing.assert_close(p.grad.float(), r.grad, rtol=tol, atol=1e-6)


def test_clip_without_gradients_is_zero():
    p = nn.Parameter(torch.randn(3))
    assert local_shards.clip_grad_norm([p], 1.0).item() == 0.0


def test_clip_of_other_dtensor_layouts_takes_torch_path(one_rank_mesh, monkeypatch):
    """Replicated (not row-sharded) DTensor gradients: torch's clip, with DTensor's reductions (one rank's
    local tensor is the whole one here, so the call itself is what is checked)."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    torch_clip, calls = torch.nn.utils.clip_grad_norm_, []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, n: calls.append(n) or torch_clip(ps, n))

    plain = nn.Parameter(torch.randn(6, 4))
    plain.grad = torch.randn(6, 4) * 3
    rep = nn.Parameter(distribute_tensor(plain.detach().clone(), one_rank_mesh, [Replicate()]))
    rep.grad = distribute_tensor(plain.grad.clone(), one_rank_mesh, [Replicate()])
    ref_norm = torch_clip([plain], 1.0)
    norm = local_shards.clip_grad_norm([rep], 1.0)
    assert calls == [1.0]
    torch.testing.assert_close(norm.full_tensor() if hasattr(norm, "full_tensor") else norm, ref_norm)
    torch.testing.assert_close(rep.grad.full_tensor(), plain.grad)


def test_adamw_keeps_torchs_default_for_cpu_and_sharded_parameters(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    p = nn.Parameter(torch.randn(4, 4))
    q = nn.Parameter(distribute_tensor(torch.randn(4, 4), one_rank_mesh, [Shard(0)]))
    for params in ([p], [q]):
        opt = local_shards.adamw([{"params": params, "lr": 0.1}], betas=(0.9, 0.95), weight_decay=0.1)
        assert not opt.param_groups[0]["fused"] and opt.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError):  # torch's own check of an argument still applies
        local_shards.adamw([{"params": [p]}], lr=-1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw_is_fused_on_cuda_and_steps_as_foreach():
    # bf16 weights beside fp32 scales, as full QAT trains them: one fused AdamW over both dtypes.
    torch.manual_seed(0)
    shapes = [((64, 32), torch.bfloat16), ((64, 1), torch.float32)]
    fused = [nn.Parameter(torch.randn(s, device="cuda", dtype=d)) for s, d in shapes]
    foreach = [nn.Parameter(p.detach().clone()) for p in fused]
    opt = local_shards.adamw([{"params": fused, "lr": 1e-2}], weight_decay=0.1)
    ref = torch.optim.AdamW([{"params": foreach, "lr": 1e-2}], weight_decay=0.1, foreach=True)
    assert opt.param_groups[0]["fused"] and not local_shards.adamw([{"params": [nn.Parameter(torch.ones(2))]}],
                                                                  lr=0.1).param_groups[0]["fused"]
    for _ in range(3):
        for p, q in zip(fused, foreach):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        local_shards.adamw_step(opt)
        ref.step()
    # The same update, rounded otherwise: foreach rounds each bf16 op's result, fused computes in fp32, and
    # an update of about lr (under half an ulp of a parameter beyond 2) rounds the parameter one way or the
    # other: up to an ulp (2^-7 of it) a step, three steps (measured on an H200: 3 ulps at most).
    for p, q in zip(fused, foreach):
        bf16 = p.dtype == torch.bfloat16
        torch.testing.assert_close(p.detach(), q.detach(), rtol=3 * 2**-7 if bf16 else 1e-5,
                                   atol=1e-3 if bf16 else 1e-6)
