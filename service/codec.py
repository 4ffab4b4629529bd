"""Wire formats -> image tensors: raw buffers, typed values and PNG/JPEG files, validated precisely.

Every function returns a float32 tensor (N, C, H, W) in [0, 1] that
:func:`detector.screening.check_images` accepts, or raises :class:`~service.errors.InvalidInput` whose
message says what is wrong (shape, dtype, byte count, range, NaN/Inf, count, encoding). Nothing here
knows about protobuf or gRPC; the servicers pass the fields in.

Untrusted encoded images: only PNG and JPEG decoders are tried, and an image's size is read from its
header and must equal the model's (H, W) before any pixel is decoded, so a decompression bomb (a small
file claiming a huge canvas) is refused without allocating it. Truncated or corrupt files are refused.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import InvalidInput

# dtype name -> little-endian numpy dtype. uint8 pixels are 0..255 and scaled by 1/255.
DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8"), "uint8": np.dtype("u1")}
ENCODINGS = {"PNG": "png", "JPEG": "jpeg"}


def parse_shape(shape: Sequence[int], input_shape: Sequence[int], max_images: int) -> tuple[int, int, int, int]:
    """Check a requested shape (N, C, H, W) or (C, H, W) against the model before any data is touched."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise InvalidInput(
            f"shape {list(shape)} must be (N, C, H, W) or (C, H, W) with (C, H, W) = {tuple(input_shape)}"
        )
    if any(s < 0 for s in shape):
        raise InvalidInput(f"shape {list(shape)} has a negative dimension")
    if shape[1:] != tuple(input_shape):
        raise InvalidInput(f"each image must have shape (C, H, W) = {tuple(input_shape)}, got {shape[1:]}")
    if shape[0] == 0:
        raise InvalidInput("no images given")
    if shape[0] > max_images:
        raise InvalidInput(f"{shape[0]} images exceed the limit of {max_images} per request")
    return shape  # type: ignore[return-value]


def _dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise InvalidInput(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def _to_unit_tensor(array: np.ndarray, input_shape: Sequence[int], max_images: int) -> Tensor:
    """(N, C, H, W) array of a supported dtype -> validated float32 tensor in [0, 1].

    The shape and count were checked by :func:`parse_shape`; the values are checked here in two passes (min
    and max: a NaN propagates into both, an infinity falls outside [0, 1]) on the one float32 copy made,
    with the messages of :func:`detector.screening.check_images`.
    """
    if tuple(array.shape[1:]) != tuple(input_shape) or not 0 < len(array) <= max_images:
        raise InvalidInput(f"images of shape {list(array.shape)} do not fit the model's {tuple(input_shape)}")
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32)).div_(255.0)
    if array.dtype == np.float64:
        _check_float(array)  # in float64: a cast could hide a value just outside [0, 1]
        return torch.from_numpy(array.astype(np.float32))
    images = np.array(array, dtype=np.float32)  # a writable copy (the request's buffer is read-only)
    _check_float(images)
    return torch.from_numpy(images)


def _check_float(array: np.ndarray) -> None:
    lo, hi = float(array.min()), float(array.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InvalidInput("images contain NaN or infinite values")
    if lo < 0 or hi > 1:
        raise InvalidInput(f"pixel values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


def images_from_buffer(
    data: bytes, dtype: str, shape: Sequence[int], input_shape: Sequence[int], max_images: int
) -> Tensor:
    """Images from raw row-major bytes of ``dtype`` (a :data:`DTYPES` name) and ``shape``."""
    np_dtype = _dtype(dtype)
    shape = parse_shape(shape, input_shape, max_images)
    expected = math.prod(shape) * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{len(data)} bytes of data do not match shape {list(shape)} of {dtype} ({expected} bytes expected)"
        )
    return _to_unit_tensor(np.frombuffer(data, dtype=np_dtype).reshape(shape), input_shape, max_images)


def images_from_values(
    values: Sequence[float] | np.ndarray, dtype: str, shape: Sequence[int], input_shape: Sequence[int], max_images: int
) -> Tensor:
    """Images from a flat sequence of typed values (e.g. KServe ``fp32_contents``) and ``shape``."""
    np_dtype = _dtype(dtype)
    shape = parse_shape(shape, input_shape, max_images)
    expected = math.prod(shape)
    if len(values) != expected:
        raise InvalidInput(f"{len(values)} values do not match shape {list(shape)} ({expected} values expected)")
    if np_dtype == np.uint8:
        wide = np.asarray(values, dtype=np.int64)
        if len(wide) and (wide.min() < 0 or wide.max() > 255):
            raise InvalidInput(f"uint8 values must lie in [0, 255], got range [{wide.min()}, {wide.max()}]")
        array = wide.astype(np.uint8)
    else:
        array = np.asarray(values, dtype=np_dtype)
    return _to_unit_tensor(array.reshape(shape), input_shape, max_images)


def images_from_encoded(files: Sequence[bytes], input_shape: Sequence[int], max_images: int) -> Tensor:
    """Images from PNG/JPEG files, each exactly (H, W), converted to the model's channels ("L" or "RGB")."""
    if len(files) == 0:
        raise InvalidInput("no images given")
    if len(files) > max_images:
        raise InvalidInput(f"{len(files)} images exceed the limit of {max_images} per request")
    c, h, w = input_shape
    if c not in (1, 3):
        raise InvalidInput(f"encoded images need a model with 1 or 3 channels; this one takes {c}; send a tensor")
    mode = "L" if c == 1 else "RGB"
    out = np.empty((len(files), c, h, w), dtype=np.uint8)
    for i, blob in enumerate(files):
        out[i] = _decode_one(i, blob, mode, h, w)
    return _to_unit_tensor(out, input_shape, max_images)


def _decode_one(index: int, blob: bytes, mode: str, height: int, width: int) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(blob), formats=list(ENCODINGS))
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"image {index}: refused, its header claims a huge canvas ({exc})") from None
    except Exception:  # PIL raises many types for garbage; every one means "not an image we take"
        raise InvalidInput(f"image {index}: not a decodable PNG or JPEG file ({len(blob)} bytes)") from None
    with image:
        if image.size != (width, height):
            raise InvalidInput(
                f"image {index} is {image.size[0]}x{image.size[1]} (width x height); the model "
                f"takes {width}x{height} (images are not resized)"
            )
        try:
            image.load()
            pixels = np.asarray(image.convert(mode), dtype=np.uint8)
        except Exception as exc:  # truncated or corrupt data after a valid header
            raise InvalidInput(f"image {index}: cannot decode its {image.format} data ({exc})") from None
    return pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)


def encode_png(image: np.ndarray) -> bytes:
    """One image (C, H, W) in [0, 1] (float) or 0..255 (uint8), C in {1, 3} -> PNG bytes (for clients, tests)."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"image shape {array.shape} must be (C, H, W) with C = 1 or 3")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()
