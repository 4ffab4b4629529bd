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
        )

    async def _screen(self, request: pb.ScreenRequest, context) -> pb.ScreenResponse:
        info = self.service.info
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
            results=_image_results(result, info, request.options),
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


def _image_results(result: ScreenResult, info: ModelInfo, options: pb.ScreenOptions) -> list[pb.ImageResult]:
    k = min(int(options.top_k), info.num_classes)
    preds, scores, flags = result.predictions.tolist(), result.scores.tolist(), result.flags.tolist()
    active, flops = result.active_ratio.tolist(), result.flops_ratio.tolist()
    out = []
    for i, pred in enumerate(preds):
        r = pb.ImageResult(
            class_index=pred,
            class_name=info.classes[pred],
            adversarial_score=scores[i],
            is_adversarial=flags[i],
            threshold=result.threshold,
            active_filter_ratio=active[i],
            flops_fraction=flops[i],
        )
        probs = result.probabilities[i]
        if k == 0:
            r.probabilities.extend(probs.tolist())
        else:
            for c in np.argsort(-probs, kind="stable")[:k].tolist():
                r.top_classes.add(class_index=c, class_name=info.classes[c], probability=float(probs[c]))
        if options.include_path:
            r.path_bits = np.packbits(result.paths[i]).tobytes()
            r.path_length = result.paths.shape[1]
        if options.include_departure:
            r.layer_departure.extend(result.departure[i].tolist())
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
# name -> (datatype, shape after N given the model, value per image as a little-endian array)
_KSERVE_OUTPUTS: dict[str, tuple[str, Callable[[ModelInfo], list[int]], Callable[[ScreenResult], np.ndarray]]] = {
    "probabilities": ("FP32", lambda info: [info.num_classes], lambda r: r.probabilities.astype("<f4")),
    "predicted_class": ("INT64", lambda info: [], lambda r: r.predictions.astype("<i8")),
    "adversarial_score": ("FP32", lambda info: [], lambda r: r.scores.astype("<f4")),
    "is_adversarial": ("BOOL", lambda info: [], lambda r: r.flags.astype(np.bool_)),
    "active_filter_ratio": ("FP32", lambda info: [], lambda r: r.active_ratio.astype("<f4")),
    "flops_fraction": ("FP32", lambda info: [], lambda r: r.flops_ratio.astype("<f4")),
}
PLATFORM = "pathguard_pytorch"


def _kserve_response(
    result: ScreenResult, info: ModelInfo, names: list[str], request_id: str
) -> kserve_pb2.ModelInferResponse:
    response = kserve_pb2.ModelInferResponse(model_name=info.name, model_version=info.version, id=request_id)
    response.parameters["adversarial_threshold"].string_param = f"{result.threshold:.9g}"
    n = len(result)
    for name in names:
        datatype, dims, values = _KSERVE_OUTPUTS[name]
        response.outputs.add(name=name, datatype=datatype, shape=[n, *dims(info)])
        response.raw_output_contents.append(values(result).tobytes())
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
                tensor(name=name, datatype=dt, shape=[-1, *dims(info)])
                for name, (dt, dims, _) in _KSERVE_OUTPUTS.items()
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
        return _kserve_response(result, _model_of(result, info), names, request.id)

    @staticmethod
    def _requested_outputs(request: kserve_pb2.ModelInferRequest) -> list[str]:
        names = [o.name for o in request.outputs] or list(_KSERVE_OUTPUTS)
        unknown = [n for n in names if n not in _KSERVE_OUTPUTS]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; this model has {list(_KSERVE_OUTPUTS)}")
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
