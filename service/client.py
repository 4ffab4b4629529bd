"""Python client of PathGuard's own API: ``PathGuardClient("host:50051").screen(images)``.

``images`` may be a numpy array or torch tensor (N, C, H, W) or (C, H, W) -- float in [0, 1] or uint8
0..255 -- or a list of such (C, H, W) arrays or (N, C, H, W) batches, sent as one raw tensor; or PNG/JPEG
files (paths or bytes), sent encoded. A bearer token is sent only over TLS unless ``insecure_token=True``
(a plaintext channel would carry it in clear). Failures raise
:class:`grpc.RpcError` (``.code()``, ``.details()``), except per-request failures inside
:meth:`PathGuardClient.screen_stream`, which come back as :class:`StreamItem.error`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ._proto.pathguard.v1 import pathguard_pb2 as pb
from ._proto.pathguard.v1 import pathguard_pb2_grpc as pb_grpc
from .config import DEFAULT_MAX_MESSAGE_MB

ImageInput = np.ndarray | Any | str | Path | bytes | Sequence[str | Path | bytes] | Sequence[np.ndarray]
# Default deadline of a whole ScreenStream (a stream carries many requests; a unary call gets `timeout`).
DEFAULT_STREAM_TIMEOUT = 600.0

_DTYPES = {np.dtype(np.float32): pb.FLOAT32, np.dtype(np.float64): pb.FLOAT64, np.dtype(np.uint8): pb.UINT8}


@dataclass
class ClassProbability:
    class_index: int
    class_name: str
    probability: float


@dataclass
class ImageResult:
    """The prediction and screening of one image (fields as in ``pathguard.v1.ImageResult``).

    ``score_policy`` is what the server reveals (``pathguard serve --score-policy``): under ``"flag"`` the
    score, threshold and filter ratios are None and there are no probabilities; under ``"rounded"`` they
    are rounded to a 0.05 grid.
    """

    class_index: int
    class_name: str
    adversarial_score: float | None
    is_adversarial: bool
    threshold: float | None
    active_filter_ratio: float | None
    flops_fraction: float | None
    probabilities: np.ndarray | None = None  # (K,), when top_k == 0
    top_classes: list[ClassProbability] = field(default_factory=list)  # when top_k > 0
    path: np.ndarray | None = None  # (G,) uint8 bits, when include_path
    layer_departure: np.ndarray | None = None  # (L,), when include_departure
    score_policy: str = "full"

    @classmethod
    def from_proto(cls, r: pb.ImageResult, score_policy: str = "") -> ImageResult:
        path = None
        if r.path_length:
            path = np.unpackbits(np.frombuffer(r.path_bits, dtype=np.uint8))[: r.path_length]
        policy = score_policy or "full"  # a server from before score policies revealed everything
        shown = policy != "flag"
        return cls(
            class_index=r.class_index,
            class_name=r.class_name,
            adversarial_score=r.adversarial_score if shown else None,
            is_adversarial=r.is_adversarial,
            threshold=r.threshold if shown else None,
            active_filter_ratio=r.active_filter_ratio if shown else None,
            flops_fraction=r.flops_fraction if shown else None,
            score_policy=policy,
            probabilities=np.array(r.probabilities, dtype=np.float32) if len(r.probabilities) else None,
            top_classes=[ClassProbability(c.class_index, c.class_name, c.probability) for c in r.top_classes],
            path=path,
            layer_departure=np.array(r.layer_departure, dtype=np.float32) if len(r.layer_departure) else None,
        )

    @property
    def confidence(self) -> float:
        """Probability of the predicted class."""
        if self.probabilities is not None:
            return float(self.probabilities[self.class_index])
        return self.top_classes[0].probability if self.top_classes else float("nan")


@dataclass
class ModelDescription:
    name: str
    version: str
    arch: str
    classes: list[str]
    input_shape: tuple[int, ...]
    threshold: float
    layers: list[tuple[str, int]]
    path_length: int
    max_images_per_request: int
    max_batch_size: int
    encodings: list[str]
    dtypes: list[str]
    metrics: dict[str, float]
    score_policy: str = "full"


@dataclass
class ScreenError:
    """A failed request in a stream: gRPC status code name and message."""

    code: str
    message: str


@dataclass
class StreamItem:
    request_id: str
    results: list[ImageResult]
    error: ScreenError | None = None


def build_request(
    images: ImageInput,
    *,
    top_k: int = 0,
    include_path: bool = False,
    include_departure: bool = False,
    request_id: str = "",
) -> pb.ScreenRequest:
    """The ``ScreenRequest`` for ``images`` (see the module docstring for what ``images`` may be)."""
    request = pb.ScreenRequest(
        request_id=request_id,
        options=pb.ScreenOptions(top_k=top_k, include_path=include_path, include_departure=include_departure),
    )
    if isinstance(images, (str, Path, bytes)):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        if all(isinstance(p, (str, Path, bytes)) for p in images):
            request.encoded.images.extend(p if isinstance(p, bytes) else Path(p).read_bytes() for p in images)
            return request
        if any(isinstance(p, (str, Path, bytes)) for p in images):
            raise ValueError("a list of images must be all files (paths or bytes) or all arrays, not a mix")
        images = _stack([_numpy(a) for a in images])
    array = _numpy(images)
    if array.dtype.kind == "f" and array.dtype not in _DTYPES:
        array = array.astype(np.float32)
    if array.dtype not in _DTYPES:
        raise ValueError(f"images dtype {array.dtype} is not supported; use float32, float64 or uint8")
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    request.tensor.dtype = _DTYPES[np.dtype(array.dtype.name)]
    request.tensor.shape.extend(array.shape)
    request.tensor.data = array.tobytes()
    return request


def _numpy(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # torch.Tensor
        images = images.detach().cpu().numpy()
    return np.asarray(images)


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """(C, H, W) images and (N, C, H, W) batches -> one (N, C, H, W) batch (all of one dtype and shape)."""
    batches = [a[None] if a.ndim == 3 else a for a in arrays]
    shapes = {b.shape[1:] for b in batches}
    dtypes = {b.dtype for b in batches}
    if any(b.ndim != 4 for b in batches) or len(shapes) != 1 or len(dtypes) != 1:
        raise ValueError(
            f"a list of arrays must hold (C, H, W) images or (N, C, H, W) batches of one shape and "
            f"dtype; got shapes {[a.shape for a in arrays]} and dtypes {sorted(map(str, dtypes))}"
        )
    return np.concatenate(batches)


class PathGuardClient:
    """A channel to a PathGuard server. Use as a context manager or call :meth:`close`.

    Parameters
    ----------
    target : "host:port".
    token : bearer token sent with every call (``authorization: Bearer <token>``), if the server wants one.
    tls_ca : PEM CA bundle (path or bytes) to verify the server; enables TLS. ``tls=True`` without it
        uses the system roots.
    client_cert, client_key : PEM client certificate and key (path or bytes), for mTLS.
    timeout : default deadline of each unary call, seconds.
    stream_timeout : default deadline of a whole :meth:`screen_stream`, seconds.
    insecure_token : send ``token`` over a plaintext channel anyway (it travels in clear; for loopback tests).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | bytes | None = None,
        client_cert: str | Path | bytes | None = None,
        client_key: str | Path | bytes | None = None,
        timeout: float = 30.0,
        stream_timeout: float = DEFAULT_STREAM_TIMEOUT,
        insecure_token: bool = False,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        secure = bool(tls or tls_ca or client_cert)
        if token and not secure and not insecure_token:
            raise ValueError(
                f"refusing to send a bearer token to {target} over plaintext: enable TLS (tls=True or "
                "tls_ca=...) or pass insecure_token=True"
            )
        opts = [
            ("grpc.max_receive_message_length", max_message_mb << 20),
            ("grpc.max_send_message_length", max_message_mb << 20),
            *options,
        ]
        if secure:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca), private_key=_pem(client_key), certificate_chain=_pem(client_cert)
            )
            self._channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._stub = pb_grpc.PathGuardStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.stream_timeout = stream_timeout

    def screen(
        self,
        images: ImageInput,
        *,
        top_k: int = 0,
        include_path: bool = False,
        include_departure: bool = False,
        timeout: float | None = None,
    ) -> list[ImageResult]:
        """Screen images in one call; one :class:`ImageResult` per image, in order."""
        request = build_request(images, top_k=top_k, include_path=include_path, include_departure=include_departure)
        response = self._stub.ScreenImages(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return [ImageResult.from_proto(r, response.score_policy) for r in response.results]

    def screen_stream(
        self,
        batches: Iterable[ImageInput],
        *,
        top_k: int = 0,
        include_path: bool = False,
        include_departure: bool = False,
        timeout: float | None = None,
    ) -> Iterator[StreamItem]:
        """Screen many requests over one bidirectional stream (pipelined); yields one item per request, in
        order, with ``request_id`` the request's position as a string. ``timeout`` bounds the whole stream
        (default :attr:`stream_timeout`)."""
        requests = (
            build_request(
                b, top_k=top_k, include_path=include_path, include_departure=include_departure, request_id=str(i)
            )
            for i, b in enumerate(batches)
        )
        for response in self._stub.ScreenStream(
            requests, timeout=timeout or self.stream_timeout, metadata=self._metadata
        ):
            error = None
            if response.HasField("error"):
                error = ScreenError(response.error.code_name, response.error.message)
            results = [ImageResult.from_proto(r, response.score_policy) for r in response.results]
            yield StreamItem(response.request_id, results, error)

    def describe(self, timeout: float | None = None) -> ModelDescription:
        d = self._stub.DescribeModel(
            pb.DescribeModelRequest(), timeout=timeout or self.timeout, metadata=self._metadata
        )
        return ModelDescription(
            name=d.name,
            version=d.version,
            arch=d.arch,
            classes=list(d.classes),
            input_shape=tuple(d.input_shape),
            threshold=d.threshold,
            layers=[(layer.name, layer.filters) for layer in d.layers],
            path_length=d.path_length,
            max_images_per_request=d.max_images_per_request,
            max_batch_size=d.max_batch_size,
            encodings=list(d.encodings),
            dtypes=[pb.DataType.Name(t) for t in d.dtypes],
            metrics=dict(d.metrics),
            score_policy=d.score_policy or "full",
        )

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """``grpc.health.v1`` status name of ``service`` ("" = the server): "SERVING", "NOT_SERVING", ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PathGuardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pem(value: str | Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()
