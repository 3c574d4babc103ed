"""Device, precision and attention choices."""

import pytest
import torch

from stoptool.errors import UserError
from stoptool.models.encoder import build_encoder, encode
from stoptool.train.runtime import attention_impl, resolve_device, resolve_precision, set_attention


def test_auto_attention_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_impl("auto", cpu, "bf16") == "math"
    assert attention_impl("auto", cpu, "fp32") == "sdpa"
    assert attention_impl("auto", cuda, "bf16") == "sdpa"
    assert attention_impl("sdpa", cpu, "bf16") == "sdpa"
    assert attention_impl("auto", cpu, "bf16", training=False) == "sdpa"  # extraction: forward only


def test_both_attention_paths_compute_the_same_features():
    torch.manual_seed(0)
    model = build_encoder("vit_t4", 16).eval()
    x = torch.randn(2, 3, 16, 16)
    set_attention(model, "sdpa")
    fused = encode(model, x)
    set_attention(model, "math")
    assert not any(getattr(m, "fused_attn", False) for m in model.modules())
    assert torch.allclose(encode(model, x), fused, atol=1e-5)


def test_device_and_precision_errors():
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu:banana")
    with pytest.raises(UserError, match="fp16 is for GPUs"):
        resolve_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
