"""Fuzz PathGuard's request surface with hypothesis: own API, KServe v2 and raw wire bytes.

Each generated case is one call -- ``ScreenImages``, ``ModelInfer``, ``DescribeModel`` or a ``ScreenStream``
of several requests -- with random shapes (huge, negative, empty), dtypes and datatypes (known and not),
byte counts, NaN/Inf and out-of-range values, PNG/JPEG files (valid in many modes, wrongly sized,
truncated, bit-flipped, other formats, header and zlib decompression bombs, text-chunk bombs), garbage
and mutated protobuf bytes, and sometimes a message over the size limit. An independent **reference
oracle** (this file, not the service's codec) says what each case deserves: OK (then the answer is
checked: one result per image, scores in [0, 1]), INVALID_ARGUMENT, NOT_FOUND (a KServe call naming
another model), RESOURCE_EXHAUSTED (over the message limit: the receive limit the server derives from the
model, computed here the same way; any larger message, or a stream holding one, may get only that), or
"OK or INVALID_ARGUMENT" where only the decoder can tell (a mutated file). Any other code, or a different
one, is a violation.

Between cases the server must stay alive and SERVING; its resident memory is read at the start and the end.

    export OMP_WAIT_POLICY=PASSIVE
    .venv/bin/python -m bench.fuzz --bundle models/default --cases 10000 --json fuzz.json   # starts a server
    .venv/bin/python -m bench.fuzz --target 127.0.0.1:50051 --cases 2000 --server-pid PID

``tests/test_service_fuzz.py`` runs the same strategies briefly (bounded examples) in CI. Exit code 0 when
there was no violation and the server was alive at the end.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import math
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import hypothesis
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.pathguard.v1 import pathguard_pb2 as pb
from service.config import ServeConfig

from .helpers import CHANNEL_OPTIONS, ServerProcess, rss_bytes

log = logging.getLogger("fuzz")

SCREEN = "/pathguard.v1.PathGuard/ScreenImages"
STREAM = "/pathguard.v1.PathGuard/ScreenStream"
DESCRIBE = "/pathguard.v1.PathGuard/DescribeModel"
INFER = "/inference.GRPCInferenceService/ModelInfer"
OK, INVALID, NOT_FOUND, EXHAUSTED = "OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"
OK_OR_INVALID = frozenset({OK, INVALID})

KSERVE_OUTPUTS = (
    "probabilities",
    "predicted_class",
    "adversarial_score",
    "is_adversarial",
    "active_filter_ratio",
    "flops_fraction",
)
_OWN_DTYPES = {pb.FLOAT32: np.dtype("<f4"), pb.FLOAT64: np.dtype("<f8"), pb.UINT8: np.dtype("u1")}
_KSERVE_DTYPES = {
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
    "UINT8": (np.dtype("u1"), "uint_contents"),
}


@dataclass(frozen=True)
class Model:
    """What the oracle needs to know about the server (from DescribeModel)."""

    name: str
    version: str
    input_shape: tuple[int, int, int]
    max_images: int = 64
    max_message_bytes: int = 16 << 20  # the server's receive limit: describe_model derives it as the server does


@dataclass
class Case:
    """One call: ``method``, its serialized request(s), and the status codes it may get back."""

    method: str
    payload: bytes | list[bytes]  # a list: the requests of one ScreenStream
    allowed: frozenset[str] | list[frozenset[str]]
    images: int | list[int] = 0  # images in a request expected to succeed (to check the answer)
    note: str = ""

    def describe(self, limit: int = 300) -> str:
        size = sum(map(len, self.payload)) if isinstance(self.payload, list) else len(self.payload)
        return f"{self.method} [{self.note}] {size} bytes"[:limit]


# ----------------------------------------------------------------------------------------------------
# the reference oracle: what a request deserves, decided from the protocol's rules alone
# ----------------------------------------------------------------------------------------------------
def _shape_ok(shape: list[int], model: Model) -> int | None:
    """The image count of a valid (N, C, H, W) or (C, H, W) shape, else None."""
    shape = list(shape)
    if len(shape) == 3:
        shape = [1, *shape]
    if len(shape) != 4 or tuple(shape[1:]) != model.input_shape or not 1 <= shape[0] <= model.max_images:
        return None
    return shape[0]


def _values_ok(values: np.ndarray) -> bool:
    if values.dtype.kind == "f":
        return bool(np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1)
    return True


def tensor_verdict(dtype: np.dtype | None, shape: list[int], data: bytes, model: Model) -> tuple[str, int]:
    """(expected code, images) of a raw tensor."""
    n = _shape_ok(shape, model) if dtype is not None else None
    if n is None or len(data) != n * math.prod(model.input_shape) * dtype.itemsize:
        return INVALID, 0
    return (OK, n) if _values_ok(np.frombuffer(data, dtype=dtype)) else (INVALID, 0)


def kserve_verdict(req: kserve_pb2.ModelInferRequest, model: Model) -> tuple[str, int]:
    if req.model_name != model.name or (req.model_version and req.model_version != model.version):
        return NOT_FOUND, 0
    if any(o.name not in KSERVE_OUTPUTS for o in req.outputs):
        return INVALID, 0
    if len(req.inputs) != 1 or req.inputs[0].name != "images" or req.inputs[0].datatype not in _KSERVE_DTYPES:
        return INVALID, 0
    tensor = req.inputs[0]
    if len(tensor.shape) != 4:  # KServe v2 takes (N, C, H, W) only
        return INVALID, 0
    dtype, field_name = _KSERVE_DTYPES[tensor.datatype]
    if req.raw_input_contents:
        if len(req.raw_input_contents) != 1 or tensor.HasField("contents"):
            return INVALID, 0
        return tensor_verdict(dtype, list(tensor.shape), req.raw_input_contents[0], model)
    if not tensor.HasField("contents"):
        return INVALID, 0
    n = _shape_ok(list(tensor.shape), model)
    values = list(getattr(tensor.contents, field_name))
    if n is None or len(values) != n * math.prod(model.input_shape):
        return INVALID, 0
    if dtype.kind == "u":
        return (OK, n) if all(0 <= v <= 255 for v in values) else (INVALID, 0)
    with np.errstate(over="ignore"):
        array = np.asarray(values, dtype=dtype)
    return (OK, n) if _values_ok(array) else (INVALID, 0)


# ----------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a ``width`` x ``height`` canvas."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


@functools.lru_cache(maxsize=8)
def png_zlib_bomb(width: int, height: int, inflated: int) -> bytes:
    """A right-sized grey PNG whose pixel data inflates to ``inflated`` bytes (far more than the image)."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(b"\0" * inflated, 9))
        + _chunk(b"IEND", b"")
    )


@functools.lru_cache(maxsize=8)
def png_text_bomb(width: int, height: int, inflated: int) -> bytes:
    """A right-sized PNG with a compressed text chunk that inflates to ``inflated`` bytes."""
    raw = zlib.compress(b"\0" * ((width + 1) * height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + _chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * inflated, 9))
        + _chunk(b"IDAT", raw)
        + _chunk(b"IEND", b"")
    )


def jpeg_header_bomb(width: int, height: int) -> bytes:
    """A small JPEG whose SOF header is patched to claim ``width`` x ``height``."""
    data = bytearray(encode(np.zeros((8, 8), np.uint8), "JPEG", "L"))
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            data[at + 5 : at + 9] = struct.pack(">HH", height, width)
            break
    return bytes(data)


def encode(pixels: np.ndarray, fmt: str, mode: str) -> bytes:
    image = Image.fromarray(pixels)
    if image.mode != mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def other_format(fmt: str, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 7).save(buf, format=fmt)
    return buf.getvalue()


_SPECIAL = (np.nan, np.inf, -np.inf, -0.0, 1.0, 0.0, 1.0000001, -1e-30, 5e-324, 2.0, 255.0, 1e300)
_DIMS = (0, 1, 2, 3, 16, 28, 32, 64, 65, -1, -(2**31), 2**31, 2**40, 2**62, 2**63 - 1, -(2**63))


# ----------------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------------
def _pixels(seed: int, n: int, model: Model) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *model.input_shape))


@st.composite
def shapes(draw, model: Model) -> list[int]:
    """Mostly near-valid shapes, sometimes anything."""
    kind = draw(st.integers(0, 9))
    n = draw(st.sampled_from((1, 1, 2, 3, model.max_images, model.max_images + 1, 0, -1, 2**40)))
    if kind < 6:
        return [n, *model.input_shape] if kind < 4 else list(model.input_shape)
    if kind < 8:
        shape = [n, *model.input_shape]
        shape[draw(st.integers(0, 3))] = draw(st.sampled_from(_DIMS))
        return shape
    return draw(st.lists(st.sampled_from(_DIMS), max_size=7))


@st.composite
def tensor_bytes(draw, dtype: np.dtype | None, shape: list[int], model: Model) -> bytes:
    """Data for a claimed shape: the right length (valid or with special values) or any length."""
    per_image = math.prod(model.input_shape)
    n = _shape_ok(shape, model) or draw(st.integers(1, 3))
    itemsize = dtype.itemsize if dtype is not None else draw(st.sampled_from((1, 4, 8)))
    kind = draw(st.integers(0, 9))
    if kind < 5 and dtype is not None:
        values = _pixels(draw(st.integers(0, 2**16)), n, model).ravel()
        if dtype.kind == "u":
            values = np.floor(values * 256).clip(0, 255)
        for _ in range(draw(st.integers(0, 3)) if kind >= 2 else 0):
            values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(_SPECIAL))
        with np.errstate(invalid="ignore", over="ignore"):
            data = values.astype(dtype).tobytes()
        return data if kind < 4 else data[: draw(st.integers(0, len(data)))]
    if kind < 8:
        return draw(st.binary(min_size=n * per_image * itemsize, max_size=n * per_image * itemsize))
    return draw(st.binary(max_size=4096))


@st.composite
def own_tensor_case(draw, model: Model) -> tuple[pb.ScreenRequest, str, int]:
    dtype_code = draw(
        st.sampled_from((pb.FLOAT32, pb.FLOAT32, pb.FLOAT64, pb.UINT8, pb.DATA_TYPE_UNSPECIFIED, 4, 99, -7, 2**31 - 1))
    )
    dtype = _OWN_DTYPES.get(dtype_code)
    shape = draw(shapes(model))
    data = draw(tensor_bytes(dtype, shape, model))
    request = pb.ScreenRequest(tensor=pb.Tensor(dtype=dtype_code, shape=shape, data=data))
    code, n = tensor_verdict(dtype, shape, data, model)
    return request, code, n


@st.composite
def image_file(draw, model: Model) -> tuple[bytes, frozenset[str], str]:
    """(file, allowed codes, note)."""
    c, h, w = model.input_shape
    seed = draw(st.integers(0, 2**16))
    grey = (np.random.default_rng(seed).uniform(0, 1, (h, w)) * 255).astype(np.uint8)
    colour = np.repeat(grey[..., None], 3, axis=2)
    kind = draw(st.integers(0, 13))
    encodable = c in (1, 3)
    if kind <= 2 and encodable:
        fmt, mode = draw(
            st.sampled_from(
                (
                    ("PNG", "L"),
                    ("PNG", "RGB"),
                    ("PNG", "RGBA"),
                    ("PNG", "LA"),
                    ("PNG", "P"),
                    ("PNG", "1"),
                    ("JPEG", "L"),
                    ("JPEG", "RGB"),
                    ("JPEG", "CMYK"),
                )
            )
        )
        return encode(colour if mode != "L" else grey, fmt, mode), frozenset({OK}), f"{fmt}/{mode}"
    if kind == 3:
        fmt = draw(st.sampled_from(("PNG", "JPEG")))
        dh, dw = draw(st.sampled_from(((1, 0), (0, 1), (-1, 0), (h, w))))
        pixels = (np.random.default_rng(seed).uniform(0, 1, (h + dh, w + dw)) * 255).astype(np.uint8)
        return encode(pixels, fmt, "L"), frozenset({INVALID}), f"{fmt} wrong size"
    valid = encode(grey, draw(st.sampled_from(("PNG", "JPEG"))), "L")
    if kind == 4:
        cut = draw(st.integers(0, len(valid) - 1))
        return valid[:cut], OK_OR_INVALID if cut > len(valid) - 16 else frozenset({INVALID}), f"truncated at {cut}"
    if kind == 5:
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data), OK_OR_INVALID, "bit flips"
    if kind == 6:
        return draw(st.binary(max_size=2048)).lstrip(b"\x89\xff"), frozenset({INVALID}), "garbage"
    if kind == 7:
        prefix = draw(st.sampled_from((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0")))
        return prefix + draw(st.binary(max_size=512)), frozenset({INVALID}), "magic + garbage"
    return _hostile_file(draw, kind, h, w)


def _hostile_file(draw, kind: int, h: int, w: int) -> tuple[bytes, frozenset[str], str]:
    """Kinds 8-13 of :func:`image_file`: decompression bombs, other formats, an empty file."""
    if kind == 8:
        width, height = draw(
            st.sampled_from(((100_000, 100_000), (2**31 - 1, 2**31 - 1), (10_000, 10_000), (w, 1_000_000), (1, 1)))
        )
        return png_header_bomb(width, height), frozenset({INVALID}), f"PNG header bomb {width}x{height}"
    if kind == 9:
        width, height = draw(st.sampled_from(((65_000, 65_000), (20_000, 20_000), (w + 1, h))))
        return jpeg_header_bomb(width, height), frozenset({INVALID}), f"JPEG header bomb {width}x{height}"
    if kind == 10:
        inflated = draw(st.sampled_from((1 << 20, 16 << 20, 64 << 20)))
        return png_zlib_bomb(w, h, inflated), OK_OR_INVALID, f"zlib bomb {inflated >> 20} MiB"
    if kind == 11:
        inflated = draw(st.sampled_from((1 << 20, 64 << 20)))
        return png_text_bomb(w, h, inflated), OK_OR_INVALID, f"text bomb {inflated >> 20} MiB"
    if kind == 12:
        fmt = draw(st.sampled_from(("GIF", "BMP", "TIFF", "WEBP", "PPM")))
        return other_format(fmt, h, w), frozenset({INVALID}), fmt
    return b"", frozenset({INVALID}), "empty file"


@st.composite
def own_encoded_case(draw, model: Model) -> tuple[pb.ScreenRequest, frozenset[str], int]:
    count = draw(st.sampled_from((0, 1, 1, 1, 2, 3, model.max_images + 1)))
    files = [draw(image_file(model)) for _ in range(min(count, 3))]
    if count > 3:
        files = files + [files[-1]] * (count - 3)
    request = pb.ScreenRequest(encoded=pb.EncodedImages(images=[f for f, _, _ in files]))
    verdicts = [a for _, a, _ in files]
    if not 1 <= count <= model.max_images or any(a == frozenset({INVALID}) for a in verdicts):
        return request, frozenset({INVALID}), 0
    if all(a == frozenset({OK}) for a in verdicts):
        return request, frozenset({OK}), count
    return request, OK_OR_INVALID, count


@st.composite
def options(draw) -> pb.ScreenOptions:
    return pb.ScreenOptions(
        top_k=draw(st.sampled_from((0, 0, 1, 3, 100, 2**32 - 1))),
        include_path=draw(st.booleans()),
        include_departure=draw(st.booleans()),
    )


@st.composite
def own_case(draw, model: Model) -> Case:
    if draw(st.integers(0, 2)) == 0:
        request, allowed, n = draw(own_encoded_case(model))
        note = "encoded"
    else:
        request, code, n = draw(own_tensor_case(model))
        allowed, note = frozenset({code}), f"tensor {list(request.tensor.shape)[:8]}"
    if draw(st.integers(0, 9)) == 0:
        request = pb.ScreenRequest()
        allowed, n, note = frozenset({INVALID}), 0, "empty request"
    request.request_id = draw(st.text(max_size=40))
    request.options.CopyFrom(draw(options()))
    return Case(SCREEN, request.SerializeToString(), allowed, n, note)


@st.composite
def valid_kserve(draw, model: Model) -> kserve_pb2.ModelInferRequest:
    """A well-formed KServe request (raw or typed contents), to be mutated once or not at all."""
    n = draw(st.integers(1, 3))
    datatype = draw(st.sampled_from(tuple(_KSERVE_DTYPES)))
    dtype, field_name = _KSERVE_DTYPES[datatype]
    values = _pixels(draw(st.integers(0, 2**16)), n, model)
    if dtype.kind == "u":
        values = np.floor(values * 256).clip(0, 255)
    req = kserve_pb2.ModelInferRequest(model_name=model.name, model_version=draw(st.sampled_from(("", model.version))))
    tensor = req.inputs.add(name="images", datatype=datatype, shape=[n, *model.input_shape])
    if draw(st.booleans()):
        req.raw_input_contents.append(values.astype(dtype).tobytes())
    else:
        getattr(tensor.contents, field_name).extend(values.astype(dtype).ravel().tolist())
    for name in draw(st.lists(st.sampled_from(KSERVE_OUTPUTS), max_size=3, unique=True)):
        req.outputs.add(name=name)
    return req


def _mutate_kserve(draw, req: kserve_pb2.ModelInferRequest, model: Model) -> str:
    """Change one thing of a valid request; returns what."""
    tensor = req.inputs[0]
    what = draw(
        st.sampled_from(("none", "none", "value", "shape", "datatype", "truncate", "name", "output", "second-input"))
    )
    if what == "value":
        special = float(draw(st.sampled_from(_SPECIAL)))
        if req.raw_input_contents:
            dtype = _KSERVE_DTYPES[tensor.datatype][0]
            data = bytearray(req.raw_input_contents[0])
            with np.errstate(invalid="ignore", over="ignore"):
                data[: dtype.itemsize] = np.array([special]).astype(dtype).tobytes()
            req.raw_input_contents[0] = bytes(data)
        elif tensor.datatype == "UINT8":
            tensor.contents.uint_contents[0] = draw(st.sampled_from((0, 255, 256, 2**32 - 1)))
        else:
            getattr(tensor.contents, _KSERVE_DTYPES[tensor.datatype][1])[0] = special
    elif what == "shape":
        tensor.shape[draw(st.integers(0, 3))] = draw(st.sampled_from(_DIMS))
    elif what == "datatype":
        tensor.datatype = draw(st.sampled_from(("FP32", "FP64", "UINT8", "INT8", "FP16", "")))
    elif what == "truncate" and req.raw_input_contents:
        req.raw_input_contents[0] = req.raw_input_contents[0][:-1]
    elif what == "name":
        tensor.name = draw(st.sampled_from(("input__0", "", "images ")))
    elif what == "output":
        req.outputs.add(name=draw(st.sampled_from(("logits", "", "probabilities"))))
    elif what == "second-input":
        req.inputs.add().CopyFrom(tensor)
    return what


def _fill_contents(draw, tensor, model: Model) -> None:
    """Put a tensor's values in one typed ``contents`` field (sometimes one too many or few, or out of range)."""
    n = _shape_ok(list(tensor.shape), model) or 1
    count = n * math.prod(model.input_shape) + draw(st.sampled_from((0, 0, 0, -1, 1)))
    tensor.contents.SetInParent()
    target = draw(st.sampled_from(("fp32_contents", "fp64_contents", "uint_contents", "int_contents")))
    if target == "uint_contents":
        values = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, count).tolist()
        if count and draw(st.booleans()):
            values[0] = draw(st.sampled_from((256, 2**32 - 1)))
    elif target == "int_contents":
        values = [draw(st.integers(-(2**31), 2**31 - 1))] * count
    else:
        values = np.random.default_rng(draw(st.integers(0, 2**16))).uniform(0, 1, count).tolist()
        if count and draw(st.booleans()):
            values[draw(st.integers(0, count - 1))] = float(draw(st.sampled_from(_SPECIAL)))
    getattr(tensor.contents, target).extend(values)


@st.composite
def kserve_case(draw, model: Model) -> Case:
    if draw(st.integers(0, 1)) == 0:
        req = draw(valid_kserve(model))
        what = _mutate_kserve(draw, req, model)
        code, n = kserve_verdict(req, model)
        return Case(INFER, req.SerializeToString(), frozenset({code}), n, f"valid KServe, mutated: {what}")
    req = kserve_pb2.ModelInferRequest(
        model_name=draw(st.sampled_from((model.name,) * 12 + ("", "resnet", model.name.upper(), "x" * 20_000))),
        model_version=draw(st.sampled_from(("",) * 4 + (model.version, "0", "9" * 30))),
        id=draw(st.text(max_size=20)),
    )
    datatypes = (
        "FP32",
        "FP32",
        "FP32",
        "FP64",
        "UINT8",
        "UINT8",
        "INT8",
        "INT32",
        "FP16",
        "BF16",
        "BYTES",
        "BOOL",
        "",
        "fp32",
        "Q" * 5000,
    )
    for i in range(draw(st.sampled_from((1, 1, 1, 1, 0, 2)))):
        tensor = req.inputs.add(
            name=draw(st.sampled_from(("images",) * 6 + ("input__0", "", "IMAGES"))),
            datatype=draw(st.sampled_from(datatypes)),
            shape=draw(shapes(model)),
        )
        dtype = _KSERVE_DTYPES.get(tensor.datatype, (None, None))[0]
        how = draw(st.integers(0, 9))
        if how < 6:
            req.raw_input_contents.append(draw(tensor_bytes(dtype, list(tensor.shape), model)))
            if how == 5:
                req.raw_input_contents.append(b"\0" * 4)
        elif how < 9:
            _fill_contents(draw, tensor, model)
            if how == 8:
                req.raw_input_contents.append(b"\0")
        if i and draw(st.booleans()):
            break
    for _ in range(draw(st.sampled_from((0, 0, 0, 1, 2)))):
        req.outputs.add(name=draw(st.sampled_from(KSERVE_OUTPUTS + ("logits", ""))))
    code, n = kserve_verdict(req, model)
    return Case(
        INFER,
        req.SerializeToString(),
        frozenset({code}),
        n,
        f"{[i.datatype[:12] for i in req.inputs]} {[list(i.shape)[:6] for i in req.inputs]}",
    )


@st.composite
def wire_case(draw, model: Model) -> Case:
    """Raw bytes where a protobuf message is expected: garbage, or a valid request mutated."""
    method = draw(st.sampled_from((SCREEN, INFER, DESCRIBE)))
    kind = draw(st.integers(0, 2))
    if kind == 0:
        data = draw(st.binary(max_size=1024))
    else:
        base = draw(own_case(model) if method != INFER else kserve_case(model)).payload
        data = bytearray(base or b"\x0a\x00")
        if kind == 1:
            for _ in range(draw(st.integers(1, 6))):
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        else:
            data = data[: draw(st.integers(0, len(data)))]
        data = bytes(data)
    allowed = {OK, INVALID} | ({NOT_FOUND} if method == INFER else set())
    return Case(method, data, frozenset(allowed), 0, f"wire {'garbage' if kind == 0 else 'mutated'}")


@st.composite
def oversize_case(draw, model: Model) -> Case:
    """A message over the server's limit (one in ten draws; the rest are ordinary own-API cases)."""
    if draw(st.integers(0, 9)):
        return draw(own_case(model))
    blob = b"\0" * (model.max_message_bytes + draw(st.integers(1, 1024)))
    request = pb.ScreenRequest(encoded=pb.EncodedImages(images=[blob]))
    return Case(SCREEN, request.SerializeToString(), frozenset({EXHAUSTED}), 0, "over the message limit")


@st.composite
def stream_case(draw, model: Model) -> Case:
    cases = draw(st.lists(own_case(model), min_size=1, max_size=6))
    return Case(STREAM, [c.payload for c in cases], [c.allowed for c in cases], [c.images for c in cases], "stream")


def any_case(model: Model, oversize: bool = False) -> st.SearchStrategy[Case]:
    """All kinds of cases, weighted (repeats in ``one_of``): mostly own API and KServe requests."""
    weighted = [
        (own_case(model), 12),
        (kserve_case(model), 12),
        (wire_case(model), 5),
        (stream_case(model), 3),
        (oversize_case(model), 1 if oversize else 0),
    ]
    return st.one_of(*[strategy for strategy, weight in weighted for _ in range(weight)])


# ----------------------------------------------------------------------------------------------------
# running cases
# ----------------------------------------------------------------------------------------------------
class Violation(AssertionError):
    pass


def _check_answer(method: str, response: bytes, images: int) -> None:
    if method == SCREEN:
        resp = pb.ScreenResponse.FromString(response)
        _check_results(resp, images)
    elif method == INFER:
        resp = kserve_pb2.ModelInferResponse.FromString(response)
        shapes_ = {o.name: list(o.shape) for o in resp.outputs}
        if images and any(s[0] != images for s in shapes_.values()):
            raise Violation(f"KServe answer shapes {shapes_} for {images} images")


def _check_results(resp: pb.ScreenResponse, images: int) -> None:
    if images and len(resp.results) != images:
        raise Violation(f"{len(resp.results)} results for {images} images")
    for r in resp.results:
        if not 0.0 <= r.adversarial_score <= 1.0 or math.isnan(r.adversarial_score):
            raise Violation(f"adversarial_score {r.adversarial_score} outside [0, 1]")


@dataclass
class Runner:
    """Sends cases to a server over one channel and checks each answer against its case."""

    channel: grpc.Channel = field(repr=False)
    timeout: float = 60.0
    limit: int | None = None  # the server's receive limit: a larger message may only get RESOURCE_EXHAUSTED
    codes: Counter = field(default_factory=Counter, repr=False)  # "Method:CODE" -> calls
    cases: int = 0

    def __post_init__(self) -> None:
        identity = {"request_serializer": None, "response_deserializer": None}
        self._unary = {m: self.channel.unary_unary(m, **identity) for m in (SCREEN, INFER, DESCRIBE)}
        self._stream = self.channel.stream_stream(
            STREAM, request_serializer=None, response_deserializer=pb.ScreenResponse.FromString
        )

    def run(self, case: Case) -> str:
        """Send ``case``; raise :class:`Violation` when the outcome is not one it may get. Returns the code."""
        self.cases += 1
        if case.method == STREAM:
            return self._run_stream(case)
        details = ""
        try:
            response, code = self._unary[case.method](case.payload, timeout=self.timeout), OK
        except grpc.RpcError as exc:
            response, code, details = None, exc.code().name, exc.details() or ""
        self.codes[f"{case.method.rsplit('/', 1)[1]}:{code}"] += 1
        allowed = {EXHAUSTED} if self._oversized(case.payload) else case.allowed
        if code not in allowed:
            raise Violation(f"{case.describe()}: got {code} ({details[:300]}), expected {sorted(allowed)}")
        if response is not None:
            _check_answer(case.method, response, case.images)
        return code

    def _oversized(self, message: bytes) -> bool:
        return self.limit is not None and len(message) > self.limit

    def _run_stream(self, case: Case) -> str:
        try:
            responses = list(self._stream(iter(case.payload), timeout=self.timeout))
        except grpc.RpcError as exc:
            self.codes[f"ScreenStream:{exc.code().name}"] += 1
            if exc.code().name == EXHAUSTED and any(map(self._oversized, case.payload)):
                return EXHAUSTED  # gRPC ends the whole stream at a message over the receive limit
            raise Violation(f"{case.describe()}: the stream failed with {exc.code().name}: {exc.details()}") from None
        if len(responses) != len(case.payload):
            raise Violation(f"{case.describe()}: {len(responses)} responses for {len(case.payload)} requests")
        self.codes["ScreenStream:OK"] += 1
        for i, (resp, allowed, images) in enumerate(zip(responses, case.allowed, case.images)):
            code = resp.error.code_name if resp.HasField("error") else OK
            self.codes[f"ScreenStream[item]:{code}"] += 1
            if code not in allowed:
                raise Violation(
                    f"{case.describe()}: item {i} got {code} ({resp.error.message[:200]}), expected {sorted(allowed)}"
                )
            if code == OK:
                _check_results(resp, images)
        return OK


def describe_model(channel: grpc.Channel, timeout: float = 30.0, max_message_mb: int = 0) -> Model:
    """The served model, with the receive limit a server started with ``--max-message-mb max_message_mb`` (0: not
    set, the limit derived from the model) has."""
    call = channel.unary_unary(DESCRIBE, request_serializer=None, response_deserializer=pb.ModelDescription.FromString)
    d = call(b"", timeout=timeout)
    shape = tuple(d.input_shape)
    limit = ServeConfig(max_images_per_request=d.max_images_per_request, max_message_mb=max_message_mb).receive_limit(
        shape
    )
    return Model(d.name, d.version, shape, max_images=d.max_images_per_request, max_message_bytes=limit)


def serving(channel: grpc.Channel) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    except grpc.RpcError:
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


def fuzz(
    channel: grpc.Channel,
    model: Model,
    cases: int,
    *,
    seed: int | None = None,
    check_every: int = 100,
    oversize: bool = True,
    stop_on_violation: bool = False,
    memory: Callable[[], int | None] | None = None,
) -> dict:
    """Run ``cases`` generated cases (no shrinking); return codes seen, violations, liveness and (with ``memory``,
    the server's resident bytes) memory every ``check_every`` cases."""
    runner = Runner(channel, limit=model.max_message_bytes)
    violations: list[str] = []
    dead_at: list[int] = []
    rss: list[tuple[int, float]] = []

    def one(case: Case) -> None:
        if stop_on_violation and violations:
            return
        try:
            runner.run(case)
        except Violation as exc:
            violations.append(str(exc))
            log.warning("violation: %s", exc)
        if runner.cases % check_every == 0:
            if not serving(channel):
                dead_at.append(runner.cases)
            if memory is not None and (value := memory()):
                rss.append((runner.cases, round(value / 2**20, 1)))
            log.info("%d cases, %d violations", runner.cases, len(violations))

    # Generation only: a violation is recorded and the run goes on (tests/test_service_fuzz.py shrinks instead).
    test = given(any_case(model, oversize))(one)
    test = settings(
        max_examples=cases,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        derandomize=seed is None,
        suppress_health_check=list(HealthCheck),
    )(test)
    if seed is not None:
        test = hypothesis.seed(seed)(test)
    test()
    return {
        "cases": runner.cases,
        "codes": dict(sorted(runner.codes.items())),
        "violations": violations[:50],
        "violation_count": len(violations),
        "not_serving_at_case": dead_at,
        "rss_timeline_mb": rss[:: max(1, len(rss) // 50)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", help="start `pathguard serve` on this bundle (loopback, free ports)")
    where.add_argument("--target", help="HOST:PORT of a running server")
    p.add_argument("--server-pid", type=int, help="pid of the running server (memory, liveness)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--seed", type=int, help="hypothesis seed (default: derandomized, the same cases every run)")
    p.add_argument("--no-oversize", action="store_true", help="skip messages over the server's receive limit")
    p.add_argument("--max-message-mb", type=int, default=0, help="the --max-message-mb the --target server runs with")
    p.add_argument("--json", help="write the report here (it is also printed)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = ServerProcess(args.bundle, args.threads) if args.bundle else None
    target = server.target if server else args.target
    pid = server.pid if server else args.server_pid
    try:
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            model = describe_model(channel, max_message_mb=args.max_message_mb)
            rss_start, start = rss_bytes(pid) if pid else None, time.monotonic()
            report = fuzz(
                channel,
                model,
                args.cases,
                seed=args.seed,
                oversize=not args.no_oversize,
                memory=(lambda: rss_bytes(pid)) if pid else None,
            )
            elapsed = time.monotonic() - start
            alive = (server is None or server.proc.poll() is None) and serving(channel)
            rss_end = rss_bytes(pid) if pid else None
    finally:
        if server is not None:
            server.kill()
    report.update(
        {
            "target": target,
            "model": {"name": model.name, "version": model.version, "input_shape": model.input_shape},
            "seconds": round(elapsed, 1),
            "alive_at_end": alive,
            "rss_mb": {
                "start": None if rss_start is None else round(rss_start / 2**20, 1),
                "end": None if rss_end is None else round(rss_end / 2**20, 1),
                "growth": None if not (rss_start and rss_end) else round(rss_end / rss_start - 1, 4),
            },
        }
    )
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0 if alive and not report["violation_count"] and not report["not_serving_at_case"] else 1


if __name__ == "__main__":
    sys.exit(main())
