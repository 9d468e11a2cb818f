import pytest
import torch

import qatext  # registers the ops

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def knob(name: str, value):
    """One tuning knob set for a block (qatext.tuning)."""
    return qatext.tuning(**{name: value})


def kernel_names(fn):
    """The names of the CUDA kernels that fn launches, space-separated (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.name for e in prof.events())


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_qparams(n, k, bits, group_size, symmetric, device, dtype=torch.float32):
    """Scales near what min-max gives for randn weights, zeros spread over the code range."""
    g = k if group_size == -1 else group_size
    shape = (n, k // g)
    scale = (torch.rand(shape, device=device) * 0.5 + 0.75) * (4.0 / (1 << bits))
    if symmetric:
        zero = torch.full(shape, float(1 << (bits - 1)), device=device)
    else:
        zero = torch.randint(0, 1 << bits, shape, device=device).float() + torch.rand(shape, device=device) * 0.1
    return scale.to(dtype), zero.to(dtype)


def at_odd_address(t):
    """A copy of t whose data starts one byte past an aligned address (a view into a larger buffer)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-init Llama without tokenizer files (trained with --byte-tokens)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory):
    """A tiny Llama with a real byte-level BPE tokenizer trained offline on the bundled corpus."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from qatext import data

    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([data.load_kjv()[:200_000]], trainer)
    path = tmp_path_factory.mktemp("bpe")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
    cfg = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg)
    model.generation_config.max_new_tokens = 17  # something of the user's that must travel
    model.save_pretrained(path)
    return path
