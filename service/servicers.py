"""gRPC servicers: protobuf <-> domain translation only. The work is done by :class:`ScreeningService`.

Errors are raised as :mod:`service.errors` exceptions and turned into status codes by the interceptor
(:mod:`service.interceptors`); the streaming RPC turns per-request errors into ``ScreenResponse.error``
through the same :func:`~service.errors.status_of`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import numpy as np
from torch import Tensor

from detector import __version__
from detector.disclosure import REVEALS, Disclosure
from detector.screening import ScreenResult

from ._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from ._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from ._proto.pathguard.v1 import pathguard_pb2 as pb
from ._proto.pathguard.v1 import pathguard_pb2_grpc as pb_grpc
from .codec import ENCODINGS
from .errors import InvalidInput, ServiceError, status_of
from .runtime import ModelInfo, ServedResult
from .screening import ScreeningService

log = logging.getLogger(__name__)

PATHGUARD_SERVICE = pb.DESCRIPTOR.services_by_name["PathGuard"].full_name
KSERVE_SERVICE = kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Requests of one ScreenStream being screened at once: enough to fill batches, bounded so that one caller
# cannot take the whole queue (the rest wait in gRPC's flow control).
STREAM_WINDOW = 32
# A raw buffer up to this size is checked on the event loop (tens of microseconds, less than a thread hop);
# anything larger, typed values and PNG/JPEG files are decoded on the service's decoding threads.
INLINE_DECODE_BYTES = 64 << 10

_DTYPE_NAMES = {pb.FLOAT32: "float32", pb.FLOAT64: "float64", pb.UINT8: "uint8"}


def _model_of(result: ScreenResult, decoded_with: ModelInfo) -> ModelInfo:
    """The model that computed ``result`` (a reload may have swapped it since the request was decoded)."""
    return result.info if isinstance(result, ServedResult) and result.info is not None else decoded_with


def _remaining(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining)


# ----------------------------------------------------------------------------------------------------
# PathGuard's own API
# ----------------------------------------------------------------------------------------------------
class PathGuardServicer(pb_grpc.PathGuardServicer):
    def __init__(self, service: ScreeningService, stream_window: int = STREAM_WINDOW) -> None:
        self.service = service
        self.stream_window = stream_window

    async def ScreenImages(self, request: pb.ScreenRequest, context) -> pb.ScreenResponse:
        return await self._screen(request, context)

    async def ScreenStream(
        self, request_iterator: AsyncIterator[pb.ScreenRequest], context
    ) -> AsyncIterator[pb.ScreenResponse]:
        window = asyncio.Semaphore(self.stream_window)
        pending: asyncio.Queue[tuple[pb.ScreenRequest, asyncio.Task] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    pending.put_nowait((request, asyncio.ensure_future(self._screen(request, context))))
            finally:
                pending.put_nowait(None)

        reader = asyncio.ensure_future(read())
        outstanding: list[asyncio.Task] = []
        try:
            while (item := await pending.get()) is not None:
                request, task = item
                outstanding.append(task)
                try:
                    response = await task
                except ServiceError as exc:
                    code, message = status_of(exc)
                    response = pb.ScreenResponse(
                        request_id=request.request_id,
                        error=pb.Error(code=code.value[0], code_name=code.name, message=message),
                    )
                finally:
                    outstanding.remove(task)
                    window.release()
                yield response
            await reader  # re-raise a failure of the request stream itself
        finally:
            reader.cancel()
            while not pending.empty():
                item = pending.get_nowait()
                if item is not None:
                    item[1].cancel()
            for task in outstanding:
                task.cancel()

    async def DescribeModel(self, request: pb.DescribeModelRequest, context) -> pb.ModelDescription:
        info, limits = self.service.info, self.service.limits
        return pb.ModelDescription(
            name=info.name,
            version=info.version,
            arch=info.arch,
            classes=list(info.classes),
            input_shape=list(info.input_shape),
            threshold=info.threshold,
            layers=[pb.Layer(name=n, filters=f) for n, f in info.layers],
            path_length=info.path_length,
            max_images_per_request=limits.max_images_per_request,
            max_batch_size=limits.max_batch_size,
            encodings=sorted(ENCODINGS.values()),
            dtypes=sorted(_DTYPE_NAMES),
            metrics=info.metrics,
            score_policy=self.service.score_policy,
        )

    async def _screen(self, request: pb.ScreenRequest, context) -> pb.ScreenResponse:
        info = self.service.info
        _check_options(request.options, self.service.score_policy)
        if request.WhichOneof("input") == "tensor" and len(request.tensor.data) <= INLINE_DECODE_BYTES:
            with self.service.arriving():
                images = self._images(request)
        else:
            images = await self.service.decode(self._images, request)
        result = await self.service.screen(images, _remaining(context))
        info = _model_of(result, info)
        return pb.ScreenResponse(
            request_id=request.request_id,
            model_name=info.name,
            model_version=info.version,
            results=_image_results(self.service.disclose(result), info, request.options),
            score_policy=self.service.score_policy,
        )

    def _images(self, request: pb.ScreenRequest) -> Tensor:
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidInput("empty request: set `encoded` (PNG/JPEG files) or `tensor` (raw pixels)")
        if which == "encoded":
            return self.service.images_from_encoded(request.encoded.images)
        tensor = request.tensor
        if tensor.dtype not in _DTYPE_NAMES:
            name = pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values() else str(tensor.dtype)
            raise InvalidInput(
                f"tensor.dtype {name} is not supported; use one of {sorted(pb.DataType.Name(d) for d in _DTYPE_NAMES)}"
            )
        return self.service.images_from_buffer(tensor.data, _DTYPE_NAMES[tensor.dtype], tensor.shape)


def _check_options(options: pb.ScreenOptions, policy: str) -> None:
    """Refuse the extras that this deployment's score policy does not reveal (before any work is done)."""
    revealed = REVEALS[policy]
    wanted = (
        ("probabilities", options.top_k > 0, "options.top_k > 0"),
        ("paths", options.include_path, "options.include_path"),
        ("departure", options.include_departure, "options.include_departure"),
    )
    refused = [name for what, asked, name in wanted if asked and what not in revealed]
    if refused:
        raise InvalidInput(
            f"{' and '.join(refused)}: not revealed by this server (score policy {policy!r}; it answers "
            f"{_revealed_text(policy)})"
        )


def _revealed_text(policy: str) -> str:
    return {
        "full": "everything",
        "rounded": "scores and probabilities rounded to a 0.05 grid, no path or departure",
        "flag": "only the predicted class and the flag",
    }[policy]


def _image_results(shown: Disclosure, info: ModelInfo, options: pb.ScreenOptions) -> list[pb.ImageResult]:
    k = min(int(options.top_k), info.num_classes)
    preds, flags = shown.predictions.tolist(), shown.flags.tolist()
    n = len(preds)
    scores = shown.scores.tolist() if shown.scores is not None else [0.0] * n
    active = shown.active_ratio.tolist() if shown.active_ratio is not None else [0.0] * n
    flops = shown.flops_ratio.tolist() if shown.flops_ratio is not None else [0.0] * n
    out = []
    for i, pred in enumerate(preds):
        r = pb.ImageResult(
            class_index=pred,
            class_name=info.classes[pred],
            adversarial_score=scores[i],
            is_adversarial=flags[i],
            threshold=shown.threshold or 0.0,
            active_filter_ratio=active[i],
            flops_fraction=flops[i],
        )
        if shown.probabilities is not None:
            probs = shown.probabilities[i]
            if k == 0:
                r.probabilities.extend(probs.tolist())
            else:
                for c in np.argsort(-probs, kind="stable")[:k].tolist():
                    r.top_classes.add(class_index=c, class_name=info.classes[c], probability=float(probs[c]))
        if options.include_path and shown.paths is not None:
            r.path_bits = np.packbits(shown.paths[i]).tobytes()
            r.path_length = shown.paths.shape[1]
        if options.include_departure and shown.departure is not None:
            r.layer_departure.extend(shown.departure[i].tolist())
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------------
# KServe v2 / Open Inference Protocol
# ----------------------------------------------------------------------------------------------------
INPUT_NAME = "images"
# KServe datatype -> codec dtype and the typed-contents field that carries it.
_KSERVE_INPUTS = {
    "FP32": ("float32", "fp32_contents"),
    "FP64": ("float64", "fp64_contents"),
    "UINT8": ("uint8", "uint_contents"),
}
# name -> (datatype, shape after N given the model, value per image as a little-endian array or None when the
# score policy withholds it)
_KSERVE_OUTPUTS: dict[str, tuple[str, Callable[[ModelInfo], list[int]], Callable[[Disclosure], np.ndarray | None]]] = {
    "probabilities": ("FP32", lambda info: [info.num_classes], lambda d: _le(d.probabilities, "<f4")),
    "predicted_class": ("INT64", lambda info: [], lambda d: d.predictions.astype("<i8")),
    "adversarial_score": ("FP32", lambda info: [], lambda d: _le(d.scores, "<f4")),
    "is_adversarial": ("BOOL", lambda info: [], lambda d: d.flags.astype(np.bool_)),
    "active_filter_ratio": ("FP32", lambda info: [], lambda d: _le(d.active_ratio, "<f4")),
    "flops_fraction": ("FP32", lambda info: [], lambda d: _le(d.flops_ratio, "<f4")),
}
# the Disclosure field behind each output that a score policy may withhold
_KSERVE_REVEALED_AS = {
    "probabilities": "probabilities",
    "adversarial_score": "scores",
    "active_filter_ratio": "active_ratio",
    "flops_fraction": "flops_ratio",
}
PLATFORM = "pathguard_pytorch"


def _le(values: np.ndarray | None, dtype: str) -> np.ndarray | None:
    return None if values is None else values.astype(dtype)


def kserve_outputs(policy: str) -> list[str]:
    """The output tensors a server under score policy ``policy`` answers with."""
    revealed = REVEALS[policy]
    return [n for n in _KSERVE_OUTPUTS if _KSERVE_REVEALED_AS.get(n, "") in revealed or n not in _KSERVE_REVEALED_AS]


def _kserve_response(
    shown: Disclosure, info: ModelInfo, names: list[str], request_id: str
) -> kserve_pb2.ModelInferResponse:
    response = kserve_pb2.ModelInferResponse(model_name=info.name, model_version=info.version, id=request_id)
    if shown.threshold is not None:
        response.parameters["adversarial_threshold"].string_param = f"{shown.threshold:.9g}"
    response.parameters["score_policy"].string_param = shown.policy
    n = len(shown)
    for name in names:
        datatype, dims, values = _KSERVE_OUTPUTS[name]
        data = values(shown)
        assert data is not None  # _requested_outputs refused the outputs the policy withholds
        response.outputs.add(name=name, datatype=datatype, shape=[n, *dims(info)])
        response.raw_output_contents.append(data.tobytes())
    return response


class InferenceServicer(kserve_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService``: the six v2 RPCs over the one served model."""

    def __init__(self, service: ScreeningService) -> None:
        self.service = service

    async def ServerLive(self, request, context) -> kserve_pb2.ServerLiveResponse:
        return kserve_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> kserve_pb2.ServerReadyResponse:
        return kserve_pb2.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request, context) -> kserve_pb2.ModelReadyResponse:
        if not self.service.ready:
            return kserve_pb2.ModelReadyResponse(ready=False)
        self.service.check_model(request.name, request.version)
        return kserve_pb2.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context) -> kserve_pb2.ServerMetadataResponse:
        return kserve_pb2.ServerMetadataResponse(name="pathguard", version=__version__, extensions=[])

    async def ModelMetadata(self, request, context) -> kserve_pb2.ModelMetadataResponse:
        info = self.service.check_model(request.name, request.version)
        tensor = kserve_pb2.ModelMetadataResponse.TensorMetadata
        # TensorMetadata holds one datatype: the input is listed once per datatype it accepts, FP32 (the
        # model's own) first, so a client that reads only the first entry still gets a valid one.
        return kserve_pb2.ModelMetadataResponse(
            name=info.name,
            versions=[info.version],
            platform=PLATFORM,
            inputs=[tensor(name=INPUT_NAME, datatype=dt, shape=[-1, *info.input_shape]) for dt in _KSERVE_INPUTS],
            outputs=[
                tensor(name=name, datatype=_KSERVE_OUTPUTS[name][0], shape=[-1, *_KSERVE_OUTPUTS[name][1](info)])
                for name in kserve_outputs(self.service.score_policy)
            ],
        )

    async def ModelInfer(self, request: kserve_pb2.ModelInferRequest, context) -> kserve_pb2.ModelInferResponse:
        info = self.service.check_model(request.model_name, request.model_version)
        names = self._requested_outputs(request)
        raw = request.raw_input_contents
        if len(raw) == 1 and len(raw[0]) <= INLINE_DECODE_BYTES:
            with self.service.arriving():
                images = self._images(request)
        else:
            images = await self.service.decode(self._images, request)
        result = await self.service.screen(images, _remaining(context))
        return _kserve_response(self.service.disclose(result), _model_of(result, info), names, request.id)

    def _requested_outputs(self, request: kserve_pb2.ModelInferRequest) -> list[str]:
        policy = self.service.score_policy
        served = kserve_outputs(policy)
        names = [o.name for o in request.outputs] or served
        unknown = [n for n in names if n not in _KSERVE_OUTPUTS]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; this model has {list(_KSERVE_OUTPUTS)}")
        withheld = [n for n in names if n not in served]
        if withheld:
            raise InvalidInput(
                f"output(s) {withheld} are not revealed by this server (score policy {policy!r}); it answers {served}"
            )
        for output in request.outputs:
            # binary_data asks for raw bytes: over gRPC every output already is (raw_output_contents).
            # Anything else (classification, shared memory...) would change the answer: refused, not ignored.
            for key, value in output.parameters.items():
                if key != "binary_data" or (
                    value.WhichOneof("parameter_choice") == "bool_param" and not value.bool_param
                ):
                    raise InvalidInput(
                        f"output {output.name!r} parameter {key!r} is not supported; outputs are "
                        f"always sent in raw_output_contents (binary_data=true is the only "
                        f"parameter accepted)"
                    )
        return names

    def _images(self, request: kserve_pb2.ModelInferRequest) -> Tensor:
        inputs = list(request.inputs)
        if not inputs:
            raise InvalidInput(f"no inputs: send one input named {INPUT_NAME!r}")
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise InvalidInput(f"expected exactly one input named {INPUT_NAME!r}, got {[i.name for i in inputs]}")
        tensor = inputs[0]
        if tensor.datatype not in _KSERVE_INPUTS:
            raise InvalidInput(
                f"input {INPUT_NAME!r} datatype {tensor.datatype!r} is not supported; "
                f"use one of {sorted(_KSERVE_INPUTS)}"
            )
        if len(tensor.shape) != 4:
            raise InvalidInput(
                f"input {INPUT_NAME!r} shape {list(tensor.shape)} must be 4-D (N, C, H, W) with "
                f"(C, H, W) = {tuple(self.service.info.input_shape)}"
            )
        dtype, field = _KSERVE_INPUTS[tensor.datatype]
        raw = request.raw_input_contents
        if raw:
            if len(raw) != len(inputs):
                raise InvalidInput(f"{len(raw)} raw_input_contents for {len(inputs)} input(s)")
            if tensor.HasField("contents"):
                raise InvalidInput("send either raw_input_contents or typed contents, not both")
            return self.service.images_from_buffer(raw[0], dtype, tensor.shape)
        if not tensor.HasField("contents"):
            raise InvalidInput(f"input {INPUT_NAME!r} has no data: set raw_input_contents or contents.{field}")
        return self.service.images_from_values(getattr(tensor.contents, field), dtype, tensor.shape)
