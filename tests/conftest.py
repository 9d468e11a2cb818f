import contextlib

import pytest
import torch

import qatext  # registers the ops

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@contextlib.contextmanager
def knob(name: str, value):
    """qatext._C.set_<name>(value) for the block, then the old value back."""
    old = getattr(qatext._C, name)()
    getattr(qatext._C, f"set_{name}")(value)
    try:
        yield
    finally:
        getattr(qatext._C, f"set_{name}")(old)


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
