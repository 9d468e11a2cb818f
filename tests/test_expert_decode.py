"""Packed experts tiled for decode stacked into a block's storage (nn.expert_decode): the layers' tensors views of
the stacks (no second copy), state dicts and saved files unchanged, a move or cast seen; on the GPU the block's
decode as two kernel launches of the grouped decode kernel against the loop, with SwiGLU in the epilogue and
without, under a CUDA graph."""

import pytest
import torch

from conftest import kernel_names
from qatext import models
from qatext.nn import expert_decode
from test_grouped_experts import EXPERTS, block, routing

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _storage(t):
    return t.untyped_storage().data_ptr()


def test_tiled_experts_are_views_of_the_blocks_stacks():
    experts = block("tiled", hidden=64, inter=64, group=16, rank=4)
    stack = experts.decode_gate_up_tiled
    assert stack.shape[0] == EXPERTS * 2 * 64 and experts.decode_down_tiled.shape[0] == EXPERTS * 64
    for e, expert in enumerate(experts):
        for name in ("gate_proj", "up_proj"):
            layer = getattr(expert, name)
            assert all(_storage(getattr(layer, t)) == _storage(getattr(experts, f"decode_gate_up_{t}"))
                       for t in expert_decode.TENSORS)
            assert getattr(expert, "_shared_input", None) is None and "decode_gate_up" not in expert._modules
        rows = slice(e * 128, e * 128 + 64)  # each expert's gate rows, then its up rows
        assert torch.equal(stack[rows], expert.gate_proj.tiled)
    assert expert_decode.current(list(experts), experts)


def test_state_dict_and_files_are_what_they_were(tmp_path):
    plain = block("packed", hidden=64, inter=64, group=16, rank=4)
    expected = {k: v.clone() for k, v in plain.state_dict().items()}
    models.tile_for_decode(plain)  # (the block's model: stacked now)
    state = plain.state_dict()
    assert state.keys() == expected.keys() and not any(k.startswith("decode_") for k in state)
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key
        assert value.untyped_storage().nbytes() == value.nbytes, f"{key} shares storage"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "block.safetensors"))


def test_a_load_in_place_writes_through_and_a_cast_is_seen():
    experts = block("tiled", hidden=64, inter=64, group=16, rank=4)
    other = block("tiled", hidden=64, inter=64, group=16, rank=4)
    with torch.no_grad():
        for p in other.buffers():
            if p.dtype == torch.uint8:
                p.bitwise_xor_(0x5A)
    experts.load_state_dict(other.state_dict())
    assert torch.equal(experts.decode_gate_up_tiled[:64], other[0].gate_proj.tiled)
    assert expert_decode.current(list(experts), experts)
    experts.double()
    assert not expert_decode.current(list(experts), experts)
    assert experts.stack_for_decode(tune=False) and expert_decode.current(list(experts), experts)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_decode_is_the_loop_in_two_launches(act, tokens):
    experts = block("packed", hidden=128, inter=64, group=64, rank=4, device="cuda", dtype=torch.bfloat16)
    if act == "gelu":
        for expert in experts:
            expert.act_fn = torch.nn.GELU()
    models.tile_for_decode(experts)
    x = torch.randn(tokens, 128, device="cuda", dtype=torch.bfloat16)
    index, weights = routing(tokens, "cuda")
    weights = weights.bfloat16()
    with torch.no_grad():
        assert experts.decodes(x, index)
        y = experts(x, index, weights)
        names = kernel_names(lambda: experts(x, index, weights))
        experts.grouped = False
        expected = experts(x, index, weights)
        experts.grouped = None
    assert names.count("decode_gemm_kernel") == 2, names
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.cuda
def test_decode_replays_under_a_cuda_graph_with_new_routings():
    experts = block("packed", hidden=128, inter=64, group=64, rank=4, device="cuda", dtype=torch.bfloat16)
    models.tile_for_decode(experts)
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    index, weights = routing(4, "cuda")
    with torch.no_grad():
        experts(x, index, weights)  # (warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = experts(x, index, weights)
        new_index, new_weights = routing(4, "cuda")
        index.copy_(new_index), weights.copy_(new_weights)
        graph.replay()
        experts.grouped = False
        expected = experts(x, index, weights)
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_a_loaded_moe_is_stacked_in_the_decode_layout(tmp_path):
    """load_quantized(decode_layout=True) tiles and stacks every block's experts; the logits are the same."""
    from qatext import QuantSpec, load_quantized, quantize_model, save_quantized
    from test_experts import SMALL, logits

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**SMALL, moe_intermediate_size=64, intermediate_size=64, num_key_value_heads=2,
                                         num_experts=4, num_experts_per_tok=2, head_dim=16)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    quantize_model(model, QuantSpec(4, 16), method="packed")
    save_quantized(model, tmp_path / "q")
    x = torch.randint(0, 256, (2, 16))
    loaded = load_quantized(tmp_path / "q", decode_layout=True)
    blocks = [m for m in loaded.modules() if hasattr(m, "decode_gate_up_tiled")]
    assert len(blocks) == 2 and all(expert_decode.current(list(b), b) for b in blocks)
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=1e-5, atol=1e-5)
    save_quantized(loaded, tmp_path / "again")  # (the views copied out: safetensors takes them)
    torch.testing.assert_close(logits(load_quantized(tmp_path / "again"), x), logits(model, x), rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.cuda
def test_decode_compiles_in_one_graph():
    """torch.compile traces the grouped decode whole (fullgraph: no break around the experts, which the loop
    needs), and the compiled block computes what the eager one does at routings it was not traced on."""
    experts = block("packed", hidden=128, inter=64, group=64, rank=4, device="cuda", dtype=torch.bfloat16)
    models.tile_for_decode(experts)
    compiled = torch.compile(experts, fullgraph=True, dynamic=False)
    x = torch.randn(2, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            index, weights = routing(2, "cuda")
            torch.testing.assert_close(compiled(x, index, weights.bfloat16()).float(),
                                       experts(x, index, weights.bfloat16()).float(), rtol=1e-2, atol=1e-2)


def test_stacks_go_when_the_layers_are_replaced():
    experts = block("tiled", hidden=64, inter=64, group=16, rank=4)
    assert experts.stackable() and "decode_down_tiled" in experts._buffers
    experts[1] = block("fake", hidden=64, inter=64, group=16, rank=4)[1]
    assert not experts.stackable() and not any(name.startswith("decode_") for name in experts._buffers)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_the_decode_path_computes_the_loop_on_the_cpu(act):
    """expert_decode.decode_experts itself (the op's per-expert path on a CPU): routing, SwiGLU or act_fn(gate) * up,
    the routing weights, pairs routed past the list; the GPU runs the same Python over one launch a projection."""
    experts = block("tiled", hidden=64, inter=64, group=16, rank=4)
    if act == "gelu":
        for expert in experts:
            expert.act_fn = torch.nn.GELU()
    x = torch.randn(9, 64)
    index, weights = routing(9, "cpu")
    with torch.no_grad():
        y = expert_decode.decode_experts(experts, list(experts), x, index, weights)
        experts.grouped = False
        expected = experts(x, index, weights)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_a_prefill_after_a_cast_stacks_the_experts_again():
    """A move or cast replaces each layer's tensors and the stacks apart (two copies of every expert): the next
    prefill makes the stacks the layers' storage again, as the next decode does, and still computes the loop."""
    experts = block("tiled", hidden=64, inter=64, group=16, rank=4)
    experts.bfloat16()
    assert not expert_decode.current(list(experts), experts)
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    index, weights = routing(40, "cpu")
    with torch.no_grad():
        assert experts.prefills(x, index) and expert_decode.current(list(experts), experts)
        y = experts(x, index, weights.bfloat16())
        experts.grouped = False
        expected = experts(x, index, weights.bfloat16())
    # (bf16 throughout: the grouped GEMMs and the loop round in different places, a few bf16 ulps)
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_the_prefill_path_computes_the_loop_on_the_cpu():
    """Past the decode kernel's pairs the block runs as grouped GEMMs over its stacks, each stack dequantised by one
    op (not the layers' codes joined again each forward): the loop's output, and nothing copied from the layers."""
    experts = block("tiled", hidden=64, inter=64, group=16, rank=4)
    x = torch.randn(40, 64)
    index, weights = routing(40, "cpu")
    with torch.no_grad():
        assert experts.prefills(x, index)
        y = experts(x, index, weights)
        experts.grouped = False
        expected = experts(x, index, weights)
        assert not experts.prefills(x, index)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    experts.grouped = None
    assert not experts.prefills(x.requires_grad_(), index)  # (a gradient: the layers' own grouped path)
