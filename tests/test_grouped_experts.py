"""A block's experts as grouped GEMMs over stacked weights (nn.grouped_experts) against the same experts
run one after another (ExpertList.grouped = False), in every mode: outputs, the input's gradient and
every trained parameter's, with an expert no token chose and pairs routed past the list; the stacked
weights never held for backward; on the GPU, no host synchronisation."""

import copy

import pytest
import torch

from qatext import QuantSpec, models, quantize_model
from qatext.nn.experts import ExpertList, unfuse_experts

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")

KINDS = ["linear", "fake", "lrqat", "e2eqp", "qalora", "packed", "tiled"]
EXPERTS, TOP_K = 4, 2


def block(kind: str, hidden: int, inter: int, group: int, rank: int, device="cpu", dtype=torch.float32):
    """One Qwen3-MoE block's experts in `kind`, the trained factors moved off their zero start."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=hidden, moe_intermediate_size=inter,
                                         intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=32, num_experts=EXPERTS,
                                         num_experts_per_tok=TOP_K)
    model = transformers.AutoModelForCausalLM.from_config(config).to(device, dtype)
    if kind == "linear":
        unfuse_experts(model)
    else:
        mode = "packed" if kind == "tiled" else kind
        quantize_model(model, QuantSpec(4, group), method=mode, **({"rank": rank} if mode in ("lrqat", "qalora") else {}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora" in name:
                    p.add_(0.05 * torch.randn_like(p))
        if kind == "tiled":
            models.tile_for_decode(model)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, ExpertList)
    return experts


def routing(tokens: int, device):
    """Top-2 routing over experts 0..2 (expert 3 gets no token), one pair in five sent past the list."""
    index = torch.stack([torch.randperm(EXPERTS - 1)[:TOP_K] for _ in range(tokens)])
    index[::5, 1] = EXPERTS  # (expert parallelism's sentinel: another rank's expert)
    return index.to(device), torch.rand(tokens, TOP_K).softmax(-1).to(device)


def run(experts, x, index, weights, grouped: bool):
    """The block's output and the gradients of x and of every trained parameter (None as zeros)."""
    experts.grouped = grouped
    x = x.detach().requires_grad_()
    y = experts(x, index, weights)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in experts.named_parameters()
             if p.requires_grad}
    experts.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def grouped_against_loop(experts, tokens: int = 23) -> dict:
    """The block's output, x's gradient and every trained parameter's, grouped against the loop (fp32: the same
    products summed in another order); returns the grouped run's parameter gradients."""
    x = torch.randn(tokens, experts[0].gate_proj.in_features)
    index, weights = routing(tokens, "cpu")
    assert experts.groups(x)
    y, gx, grads = run(experts, x, index, weights, grouped=True)
    y_ref, gx_ref, grads_ref = run(experts, x, index, weights, grouped=False)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5 * gx_ref.abs().max().item())
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-5 * grads_ref[name].abs().max().item() + 1e-12,
                                   msg=name)
    return grads


@pytest.mark.parametrize("kind", KINDS)
def test_grouped_experts_compute_and_train_as_the_loop(kind):
    grads = grouped_against_loop(block(kind, hidden=64, inter=64, group=16, rank=4))
    assert bool(grads) == (kind not in ("packed", "tiled"))
    idle = [g for n, g in grads.items() if n.startswith(f"{EXPERTS - 1}.")]
    assert not grads or idle and all(g.abs().sum() == 0 for g in idle)  # at zero: DDP / FSDP reduce every one


@pytest.mark.parametrize("kind", ["lrqat", "e2eqp", "qalora", "packed"])
def test_grouped_experts_hold_no_stacked_weight_for_backward(kind):
    experts = block(kind, hidden=64, inter=64, group=16, rank=4)
    x = torch.randn(23, 64, requires_grad=True)
    index, weights = routing(23, "cpu")
    held = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(t) or t, lambda t: t):
        experts(x, index, weights)
    own = {t.data_ptr() for t in [*experts.parameters(), *experts.buffers()]}
    # Neither a stacked weight nor a stacked copy of the codes (4 experts' 64 x 64 4-bit codes: 8192 bytes): nothing
    # of one expert's weight's 64 x 64 elements or more but the experts' own tensors (activations: 46 x 64).
    assert held and not [t.shape for t in held if t.data_ptr() not in own and t.numel() >= 64 * 64]


def test_grouped_experts_fall_back_to_the_loop_where_rows_are_not_16_byte_aligned():
    assert block("fake", hidden=64, inter=64, group=32, rank=4).groups(torch.randn(3, 64))
    assert not block("fake", hidden=64, inter=34, group=-1, rank=4).groups(torch.randn(3, 64))  # 136-byte rows


@pytest.mark.parametrize("group,rank", [(32, 4), (16, 3)])
def test_grouped_qalora_pads_its_adapter_rows_to_16_bytes(group, rank):
    """2 or 4 groups a row and rank 3 (8-16 byte rows of the pooled input and the adapter): zeros padded."""
    assert grouped_against_loop(block("qalora", hidden=64, inter=32, group=group, rank=rank))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tokens", [1, 200])
def test_grouped_experts_on_the_gpu_train_as_the_loop_without_a_host_sync(kind, tokens):
    """bf16 on the GPU: the grouped GEMMs against the loop (the decode / staged / fused kernels at these sizes).
    Each path rounds x, the hidden product and the output to bf16 (2^-9 relative each) and sums in its own
    order: 2^-6 of the largest value leaves room for that and none for a wrong expert or projection."""
    # (inter 192: the down projections have 6 groups a row, which QA-LoRA's grouped adapter pads to 8)
    experts = block(kind, hidden=256, inter=192, group=32, rank=8, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
    index, weights = routing(tokens, "cuda")
    weights = weights.bfloat16()
    assert experts.groups(x)
    experts.grouped = True
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if kind in ("packed", "tiled"):
            with torch.no_grad():
                experts(x, index, weights)
        else:
            experts(x.requires_grad_(), index, weights).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        experts.zero_grad(set_to_none=True)
    y, gx, grads = run(experts, x, index, weights, grouped=True)
    y_ref, gx_ref, grads_ref = run(experts, x, index, weights, grouped=False)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=2**-6 * y_ref.float().abs().max().item())
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=0, atol=2**-6 * gx_ref.float().abs().max().item())
    for name, g in grads.items():
        ref = grads_ref[name].float()
        torch.testing.assert_close(g.float(), ref, rtol=0, atol=2**-6 * ref.abs().max().item() + 1e-12, msg=name)


def test_a_replaced_expert_layer_is_seen_by_the_next_forward():
    experts = block("qalora", hidden=64, inter=64, group=16, rank=4)
    x = torch.randn(5, 64)
    index, weights = routing(5, "cpu")
    assert experts.groups(x)
    experts[1].up_proj = experts[1].up_proj.to_packed()  # one expert's layer of another kind: the loop runs
    assert not experts.groups(x)
    expected = experts(x, index, weights)
    for expert in experts[2:] + experts[:1]:
        expert.up_proj = expert.up_proj.to_packed()  # each projection one kind again (up packed): grouped
    assert experts.groups(x)
    torch.testing.assert_close(experts(x, index, weights), expected, rtol=1e-5, atol=1e-6)
    experts[3] = block("fake", hidden=64, inter=64, group=16, rank=4)[3]  # an item replaced
    assert not experts.groups(x)


def test_inference_with_few_tokens_an_expert_takes_the_loop():
    experts = block("packed", hidden=64, inter=64, group=16, rank=4)
    x = torch.randn(8, 64)
    few, enough = routing(7, "cpu")[0], routing(8, "cpu")[0]  # 14 and 16 pairs over 4 experts
    with torch.no_grad():
        assert not experts.takes_grouped(x, few) and experts.takes_grouped(x, enough)
        experts.grouped = True
        assert experts.takes_grouped(x, few)
    experts.grouped = None
    assert not experts.takes_grouped(x, few)  # grad mode over frozen experts: no gradient taken
    assert experts.takes_grouped(x.requires_grad_(), few)  # a gradient: grouped at any count
    trained = block("qalora", hidden=64, inter=64, group=16, rank=4)
    assert trained.takes_grouped(x.detach(), few)  # (the experts' adapters need one)
    experts.grouped = False
    assert not experts.takes_grouped(x, enough)


def test_gate_and_up_run_as_one_grouped_gemm_where_they_are_one_kind(monkeypatch):
    """Gate and up of one kind: one GEMM of 2 * inter columns (then down: 2 in all); of two kinds, one each (3)."""
    from qatext.nn import grouped_experts

    calls = []
    monkeypatch.setattr(grouped_experts, "_grouped_mm", lambda *a, **k: calls.append(a[1].shape) or torch._grouped_mm(*a, **k))
    experts = block("fake", hidden=64, inter=32, group=16, rank=4)
    x = torch.randn(9, 64)
    index, weights = routing(9, "cpu")
    experts.grouped = True
    with torch.no_grad():
        expected = experts(x, index, weights)
        assert calls == [(EXPERTS, 64, 2 * 32), (EXPERTS, 32, 64)]
        for expert in experts:
            expert.up_proj = expert.up_proj.to_packed()
        calls.clear()
        torch.testing.assert_close(experts(x, index, weights), expected, rtol=1e-5, atol=1e-6)
        assert len(calls) == 3
