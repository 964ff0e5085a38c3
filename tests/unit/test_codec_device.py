"""The torch-only codec path (the one a CUDA tensor takes) gives the host path's bytes.

Run here with ``device="cpu"``; ``bench/gpu_check.sh`` runs the same comparison on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.codec import CODEC_NAMES, get_codec
from peer.errors import CodecError

F32_MAX = float(torch.finfo(torch.float32).max)


def _tensors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    out = [torch.randn(n, generator=gen) * s for n, s in [(1, 1.0), (7, 1e-3), (255, 3.0), (256, 1.0),
                                                             (1000, 0.01), (2**20 + 13, 1.0)]]
    out.append(torch.zeros(300))
    out.append(torch.tensor([0.0, -0.0, 1e-45, -1e-40, 2.0**-130, 5.0, -5.0]))  # signed zero, subnormals
    big = torch.randn(600, generator=gen) * 1e38
    big[0] = F32_MAX
    big[1] = -F32_MAX
    out.append(big)  # scales near float32 max; sign1's float32 sums overflow in some blocks
    return out


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_torch_path_on_cpu_gives_the_host_paths_bytes_and_values(name):
    codec = get_codec(name)
    for x in _tensors():
        # Execute
        host = codec.encode(x)
        dev = codec.encode_torch(x)
        # Assert: the same bytes on the wire, and the same decoded values on either path
        assert dev == host, (name, x.numel())
        a = codec.decode(host, x.numel())
        b = codec.decode_torch(host, x.numel(), "cpu")
        assert b.dtype == torch.float32 and b.device.type == "cpu"
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (name, x.numel())


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(CODEC_NAMES),
       st.lists(st.floats(-2.0**100, 2.0**100, allow_nan=False, width=32), min_size=1, max_size=600))
def test_torch_path_matches_for_any_finite_values(name, values):
    codec = get_codec(name)
    x = torch.tensor(values, dtype=torch.float32)
    host = codec.encode(x)
    assert codec.encode_torch(x) == host
    assert torch.equal(codec.decode(host, x.numel()).view(torch.int32),
                       codec.decode_torch(host, x.numel()).view(torch.int32))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_torch_path_refuses_what_the_host_path_refuses(name):
    codec = get_codec(name)
    with pytest.raises(CodecError, match="NaN|non-finite"):
        codec.encode_torch(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(CodecError, match="1-D float32"):
        codec.encode_torch(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(CodecError, match="expected"):
        codec.decode_torch(b"\x00" * 3, 1000)
    assert codec.decode_torch(b"", 0).numel() == 0


def test_a_corrupt_int8_scale_is_refused_on_the_torch_path():
    codec = get_codec("int8")
    data = bytearray(codec.encode(torch.ones(256)))
    data[0:4] = np.array([-1.0], dtype="<f4").tobytes()
    with pytest.raises(CodecError, match="negative scale"):
        codec.decode_torch(bytes(data), 256)
