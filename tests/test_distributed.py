"""DDP and FSDP2 on CPU: 2 processes (gloo) spawned by the test train a tiny Llama with every method and
give the one-process loss curve; a sharded checkpoint saved on 2 ranks resumes on 2 ranks; the merged
model is written to one file by rank 0."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from qatext import QuantSpec, data, distributed, load_quantized, methods, models, save_quantized
from qatext.nn import QuantLinear

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

METHODS = ["full_qat", "lrqat", "qalora", "efficientqat"]
FAST = {"full_qat": dict(lr=3e-3, quant_lr=1e-3), "lrqat": dict(rank=4, lr=1e-2, scale_lr=1e-3),
        "qalora": dict(rank=4, lr=1e-2), "efficientqat": dict(e2e_lr=1e-2, block_ap_kwargs=dict(
            n_samples=8, batch_size=4, seq_len=33, epochs=1, quant_lr=1e-3, weight_lr=1e-3, progress=False))}


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _tokens():
    return data.ByteTokenizer().encode(data.load_kjv()[:20_000])


def curves(strategy, ckpt_root=None):
    """Each method for 4 steps of a global batch of 4 windows; their loss curves."""
    out = {}
    for name in METHODS:
        cfg = methods.default_config(name, steps=4, batch_size=4, seq_len=32, progress=False, distributed=strategy,
                                     checkpoint_dir=str(ckpt_root / name) if ckpt_root else None)
        _, out[name] = methods.run(name, tiny_llama(), QuantSpec(4, 32), _tokens(), cfg, **FAST[name])
    return out


def lrqat_run(ckpt=None, strategy="ddp", crash_at=None):
    """LR-QAT for 6 steps (a checkpoint every 2 when ckpt is set); crash_at: die in that step."""
    from qatext.evaluate import causal_lm_loss
    from qatext.methods.common import freeze, layer_params
    from qatext.train import train

    model = tiny_llama()
    freeze(model)
    models.quantize_model(model, QuantSpec(4, 32), method="lrqat", rank=4)
    groups = [{"params": layer_params(model, ("lora_a", "lora_b", "scale")), "lr": 1e-2}]
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return causal_lm_loss(m, batch)

    cfg = methods.default_config("lrqat", steps=6, batch_size=4, seq_len=32, progress=False, distributed=strategy,
                                 checkpoint_dir=str(ckpt) if ckpt else None, checkpoint_every=2)
    return model, train(model, groups, _tokens(), cfg, loss_fn=loss_fn)


def bf16_lrqat_curve(strategy):
    """LR-QAT on a bf16 model (fp32 scales beside bf16 LoRA factors): 4 steps; its curve and the dtypes the
    layers' forward saw for scale and lora_a."""
    model = tiny_llama(torch.bfloat16)
    seen = {}

    def record(layer, _args):
        seen.setdefault("scale", layer.scale.dtype)
        seen.setdefault("lora_a", layer.lora_a.dtype)

    cfg = methods.default_config("lrqat", steps=4, batch_size=4, seq_len=32, progress=False, distributed=strategy)
    original = QuantLinear.forward
    try:
        QuantLinear.forward = lambda self, x: (record(self, x), original(self, x))[1]
        _, history = methods.run("lrqat", model, QuantSpec(4, 32), _tokens(), cfg, **FAST["lrqat"])
    finally:
        QuantLinear.forward = original
    return history, seen


def recomputed_lrqat_curve(strategy, activation_checkpointing):
    """LR-QAT for 4 steps; its curve and how many times the decoder layers' forward ran."""
    calls = []
    layer_cls = transformers.models.llama.modeling_llama.LlamaDecoderLayer
    original = layer_cls.forward
    cfg = methods.default_config("lrqat", steps=4, batch_size=4, seq_len=32, progress=False, distributed=strategy,
                                 activation_checkpointing=activation_checkpointing)
    try:
        layer_cls.forward = lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1]
        model, history = methods.run("lrqat", tiny_llama(), QuantSpec(4, 32), _tokens(), cfg, **FAST["lrqat"])
    finally:
        layer_cls.forward = original
    restored = all("forward" not in layer.__dict__ for layer in models.decoder_layers(model))
    return history, len(calls), restored and model.config.use_cache


def train_crash_resume_merge(strategy, root):
    """Die in step 4, resume, merge and save on rank 0."""
    try:
        lrqat_run(root / "ckpt", strategy, crash_at=4)
    except KeyboardInterrupt:
        pass
    model, history = lrqat_run(root / "ckpt", strategy)
    models.merge_model(model)
    if distributed.is_main():
        save_quantized(model, root / "merged")
    distributed.barrier()
    return history


def codes_under_fsdp():
    """Wrap an LR-QAT model with FSDP2: how its first layer's frozen codes P are held, and whether
    finish() gives the original model its P back."""
    from torch.distributed.tensor import DTensor

    from qatext.methods.common import freeze, layer_params

    model = tiny_llama()
    freeze(model)
    models.quantize_model(model, QuantSpec(4, 32), method="lrqat", rank=4)
    name, layer = models.quant_layers(model)[0]
    p0 = layer.p.clone()
    wrapped = distributed.Wrapped(model, "fsdp", [{"params": layer_params(model, ("lora_a",)), "lr": 1e-2}])
    work_layer = wrapped.module.get_submodule(name)
    held = work_layer.p
    seen = []
    original = QuantLinear.forward
    try:  # in forward the layer reads P whole, in its own dtype
        QuantLinear.forward = lambda self, x: (seen.append((self.p.dtype, self.p.shape)), original(self, x))[1]
        wrapped.module(input_ids=torch.zeros(1, 8, dtype=torch.long))
    finally:
        QuantLinear.forward = original
    info = {"dtensor": isinstance(held, DTensor), "local_rows": held.to_local().shape[0], "rows": p0.shape[0],
            "freed": layer.p.numel() == 0, "seen": seen[0], "want": (p0.dtype, p0.shape),
            "outside_forward": "p" not in work_layer.__dict__}
    wrapped.finish()
    info["restored"] = torch.equal(layer.p, p0)
    return info


def _worker(rank, world, port, job, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.init_from_env() and distributed.world_size() == world
    try:
        result = job(*args)
        if rank == 0:
            torch.save(result, out)
    finally:
        torch.distributed.destroy_process_group()


def spawn(job, *args, tmp_path, world=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"{job.__name__}.pt"
    mp.spawn(_worker, args=(world, port, job, args, out), nprocs=world, join=True)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process_curves():
    return curves("ddp")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_give_the_one_process_loss_curve(tmp_path, one_process_curves, strategy):
    got = spawn(curves, strategy, tmp_path=tmp_path)
    for name in METHODS:
        assert len(got[name]) == 4
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(one_process_curves[name]), rtol=1e-4,
                                   atol=1e-4, msg=lambda m, name=name: f"{name} ({strategy}): {m}")


def test_fsdp_shards_the_frozen_codes_and_gives_them_back(tmp_path):
    """P (and the other per-row buffers of quantized layers) is sharded by rows, not replicated: each
    rank holds half, the original model's full copy is freed while training and restored after."""
    info = spawn(codes_under_fsdp, tmp_path=tmp_path)
    assert info["dtensor"] and info["local_rows"] == info["rows"] // 2
    assert info["freed"] and info["restored"]
    assert info["seen"] == info["want"] and info["outside_forward"]


def test_activation_checkpointing_recomputes_the_layers_and_keeps_the_curve(tmp_path):
    """Decoder layers run twice a step (forward, recomputation in backward), on one process and under
    FSDP2, with the plain curve; the model's own forward and KV-cache setting come back afterwards."""
    plain, plain_calls, _ = recomputed_lrqat_curve("ddp", False)
    one, one_calls, one_restored = recomputed_lrqat_curve("ddp", True)
    two, two_calls, two_restored = spawn(recomputed_lrqat_curve, "fsdp", True, tmp_path=tmp_path)
    assert plain_calls == 2 * 4 and one_calls == two_calls == 2 * plain_calls
    assert one_restored and two_restored
    torch.testing.assert_close(torch.tensor(one), torch.tensor(plain), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(two), torch.tensor(plain), rtol=1e-4, atol=1e-4)


def test_fsdp_on_a_bf16_model_keeps_fp32_scales_in_forward(tmp_path):
    """FSDP2 shards fp32 masters of what trains and gathers every parameter in its own dtype: the
    forward sees fp32 scales as in one process, and the loss curve matches it to bf16 precision."""
    got, seen = spawn(bf16_lrqat_curve, "fsdp", tmp_path=tmp_path)
    want, want_seen = bf16_lrqat_curve("ddp")  # one process
    assert seen["scale"] == want_seen["scale"] == torch.float32
    assert seen["lora_a"] == torch.float32 and want_seen["lora_a"] == torch.bfloat16  # fp32 masters when sharded
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sharded_checkpoint_resumes_and_merges_to_one_file(tmp_path, strategy):
    got = spawn(train_crash_resume_merge, strategy, tmp_path, tmp_path=tmp_path)
    assert (tmp_path / "ckpt" / "dcp" / "loop.pt").exists()
    # The same run in one process, uninterrupted: same curve, same merged model.
    single, single_history = lrqat_run()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(single_history), rtol=1e-4, atol=1e-4)
    models.merge_model(single)
    single.eval()
    merged = load_quantized(tmp_path / "merged")
    x = _tokens()[:33].unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, single(input_ids=x).logits, rtol=1e-3, atol=1e-3)


def moe_curve(strategy, method):
    """A tiny Qwen3-MoE, 16 experts and one a token over short windows, so that each rank's batch leaves
    some experts unchosen, and different ones on each rank: 3 steps of `method`; its loss curve."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
                                      num_experts_per_tok=1, max_position_embeddings=64)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    run = methods.default_config(method, steps=3, batch_size=2, seq_len=4, progress=False, distributed=strategy)
    return methods.run(method, model, QuantSpec(4, 32), _tokens(), run, **FAST[method])[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", ["full_qat", "lrqat", "qalora"])
def test_experts_no_token_chose_on_a_rank_do_not_stop_training(tmp_path, strategy, method):
    """DDP and FSDP2 reduce the same gradients on every rank: an expert that a rank's tokens did not
    choose gives zeros there (nn.experts.ExpertList), not a missing gradient that fails the step. The experts
    run as grouped GEMMs, which read the layers' codes without calling them (FSDP2 carries them as fp16)."""
    one = moe_curve("ddp", method)
    two = spawn(moe_curve, strategy, method, tmp_path=tmp_path)
    assert len(two) == 3 and all(torch.isfinite(torch.tensor(two)))
    torch.testing.assert_close(two[0], one[0], rtol=1e-4, atol=1e-4)  # the same model and batch before any step
