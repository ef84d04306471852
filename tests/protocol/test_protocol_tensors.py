"""TensorPayload: validation, wire form, digest, and torch round trips (bfloat16 bit-exact)."""

from __future__ import annotations

import pytest
import torch

from petals_protocol import DTYPES, MAX_RANK, BadTensor, TensorPayload, from_torch, to_torch

torch.set_num_threads(1)

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def wire(dtype: str = "float32", shape: object = (2, 3), data: object = None) -> dict[str, object]:
    if data is None:
        data = bytes(DTYPES[dtype] * 6)
    return {"dtype": dtype, "shape": shape, "data": data}


def test_itemsizes_match_torch() -> None:
    assert set(DTYPES) == set(TORCH_DTYPES)
    for name, dtype in TORCH_DTYPES.items():
        assert DTYPES[name] == torch.empty((), dtype=dtype).element_size()


def test_wire_round_trip() -> None:
    payload = TensorPayload("float16", (2, 3), bytes(range(12)))
    obj = payload.to_wire()
    assert obj == {"dtype": "float16", "shape": [2, 3], "data": bytes(range(12))}
    assert TensorPayload.from_wire(obj) == payload
    assert TensorPayload.from_wire({**obj, "shape": (2, 3)}) == payload  # msgpack may give tuples


@pytest.mark.parametrize(
    "obj, match",
    [
        ([], "must be a map"),
        ({"dtype": "float32", "shape": [1]}, "keys wrong"),
        ({**wire(), "extra": 1}, "keys wrong"),
        (wire(dtype="float64", data=bytes(48)), "dtype"),
        (wire(dtype=b"float32", data=bytes(24)), "dtype"),
        (wire(shape=[2, True, 3]), "ints"),
        (wire(shape=[2.0, 3]), "ints"),
        (wire(shape=[-2, -3]), "negative"),
        (wire(shape="23"), "array"),
        (wire(shape=[1] * (MAX_RANK + 1), data=bytes(4)), "rank"),
        (wire(data=bytes(23)), "needs 24 bytes"),
        (wire(data=bytearray(24)), "bytes"),
        (wire(shape=[0, 2**40]), "limit"),
        (wire(dtype="bool", shape=[2], data=b"\x01\x02"), "other than 0 and 1"),
    ],
)
def test_from_wire_rejects(obj: object, match: str) -> None:
    with pytest.raises(BadTensor, match=match):
        TensorPayload.from_wire(obj)


def test_element_limit_is_configurable() -> None:
    obj = wire(shape=[4, 4], data=bytes(64))
    assert TensorPayload.from_wire(obj, max_elements=16).shape == (4, 4)
    with pytest.raises(BadTensor, match="elements"):
        TensorPayload.from_wire(obj, max_elements=15)


def test_constructor_validates_too() -> None:
    with pytest.raises(BadTensor):
        TensorPayload("float32", (2,), bytes(4))
    with pytest.raises(BadTensor):
        TensorPayload("float32", [1], bytes(4))  # type: ignore[arg-type]


def test_digest_binds_dtype_shape_and_data() -> None:
    base = TensorPayload("float16", (2, 2), bytes(8))
    variants = [
        TensorPayload("bfloat16", (2, 2), bytes(8)),
        TensorPayload("float16", (4,), bytes(8)),
        TensorPayload("float16", (1, 4), bytes(8)),
        TensorPayload("float16", (2, 2), bytes(7) + b"\x01"),
    ]
    digests = {base.digest()} | {v.digest() for v in variants}
    assert len(digests) == 5
    assert len(base.digest()) == 32
    assert base.digest() == TensorPayload("float16", (2, 2), bytes(8)).digest()


@pytest.mark.parametrize("name", sorted(TORCH_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (2, 3), (1, 5, 7)])
def test_torch_round_trip(name: str, shape: tuple[int, ...]) -> None:
    dtype = TORCH_DTYPES[name]
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        tensor = torch.randint(0, 2, shape, generator=generator).to(torch.bool)
    elif dtype.is_floating_point:
        tensor = torch.randn(shape, generator=generator).to(dtype)
    else:
        tensor = torch.randint(-(2**31), 2**31 - 1, shape, generator=generator, dtype=torch.int64).to(dtype)
    payload = from_torch(tensor)
    assert payload.dtype == name and payload.shape == shape
    again = TensorPayload.from_wire(payload.to_wire())
    back = to_torch(again)
    assert back.dtype == dtype and tuple(back.shape) == shape
    assert back.is_contiguous()
    assert torch.equal(back, tensor)
    back.add_(1) if dtype != torch.bool else back.logical_not_()  # writable, and not aliasing `payload`
    assert to_torch(again).equal(tensor)


def test_bfloat16_bit_exact_including_specials() -> None:
    bits = torch.tensor([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x3F80, 0xC2F7], dtype=torch.int32)
    tensor = bits.to(torch.int16).view(torch.bfloat16)  # +0, -0, +inf, -inf, a NaN payload, subnormal, 1, -123.5
    payload = from_torch(tensor)
    assert payload.data == bytes.fromhex("0000" "0080" "807f" "80ff" "c17f" "0100" "803f" "f7c2")
    back = to_torch(payload)
    assert torch.equal(back.view(torch.int16), tensor.view(torch.int16))


def test_from_torch_handles_strided_views_and_refuses_other_dtypes() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    view = base[:, 1::2].t()
    payload = from_torch(view)
    assert payload.shape == (3, 4)
    assert torch.equal(to_torch(payload), view)
    with pytest.raises(BadTensor):
        from_torch(torch.zeros(2, dtype=torch.float64))


def test_little_endian_layout() -> None:
    payload = from_torch(torch.tensor([1, 256], dtype=torch.int32))
    assert payload.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_activation_codecs() -> None:
    """Compressed activations: fp16/bf16 halve the bytes, recode keeps a payload already in the
    dtype, float16 saturates instead of overflowing to inf, only float dtypes are codecs."""
    from petals_protocol.tensors import codec_dtype, encode_as, recode

    assert [codec_dtype(c) for c in ("none", "fp16", "bf16")] == [None, "float16", "bfloat16"]
    with pytest.raises(ValueError, match="fp8"):
        codec_dtype("fp8")
    tensor = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    exact = from_torch(tensor)
    assert recode(exact, "float32") is exact
    for dtype, tolerance in (("float16", 1e-3), ("bfloat16", 1e-2)):
        packed = recode(exact, dtype)
        assert packed.dtype == dtype and packed.nbytes * 2 == exact.nbytes
        assert float((to_torch(packed).float() - tensor).abs().max()) < tolerance
        assert packed.digest() != exact.digest()  # a signature binds the bytes that were sent
        assert to_torch(recode(packed, "float32")).dtype == torch.float32
    big = to_torch(encode_as(torch.tensor([1e6, -1e6, 1.0]), "float16"))
    assert big.tolist() == [65504.0, -65504.0, 1.0]
    with pytest.raises(BadTensor):
        encode_as(tensor, "int64")
