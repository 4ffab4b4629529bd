from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
    FLOAT64: _ClassVar[DataType]
    UINT8: _ClassVar[DataType]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType
FLOAT64: DataType
UINT8: DataType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EncodedImages(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ScreenOptions(_message.Message):
    __slots__ = ("top_k", "include_path", "include_departure")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PATH_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DEPARTURE_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    include_path: bool
    include_departure: bool
    def __init__(self, top_k: _Optional[int] = ..., include_path: _Optional[bool] = ..., include_departure: _Optional[bool] = ...) -> None: ...

class ScreenRequest(_message.Message):
    __slots__ = ("request_id", "encoded", "tensor", "options")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    encoded: EncodedImages
    tensor: Tensor
    options: ScreenOptions
    def __init__(self, request_id: _Optional[str] = ..., encoded: _Optional[_Union[EncodedImages, _Mapping]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., options: _Optional[_Union[ScreenOptions, _Mapping]] = ...) -> None: ...

class ClassProbability(_message.Message):
    __slots__ = ("class_index", "class_name", "probability")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    class_name: str
    probability: float
    def __init__(self, class_index: _Optional[int] = ..., class_name: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("class_index", "class_name", "probabilities", "top_classes", "adversarial_score", "is_adversarial", "threshold", "active_filter_ratio", "flops_fraction", "path_bits", "path_length", "layer_departure")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_CLASSES_FIELD_NUMBER: _ClassVar[int]
    ADVERSARIAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    IS_ADVERSARIAL_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FILTER_RATIO_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FRACTION_FIELD_NUMBER: _ClassVar[int]
    PATH_BITS_FIELD_NUMBER: _ClassVar[int]
    PATH_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LAYER_DEPARTURE_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    class_name: str
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    top_classes: _containers.RepeatedCompositeFieldContainer[ClassProbability]
    adversarial_score: float
    is_adversarial: bool
    threshold: float
    active_filter_ratio: float
    flops_fraction: float
    path_bits: bytes
    path_length: int
    layer_departure: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, class_index: _Optional[int] = ..., class_name: _Optional[str] = ..., probabilities: _Optional[_Iterable[float]] = ..., top_classes: _Optional[_Iterable[_Union[ClassProbability, _Mapping]]] = ..., adversarial_score: _Optional[float] = ..., is_adversarial: _Optional[bool] = ..., threshold: _Optional[float] = ..., active_filter_ratio: _Optional[float] = ..., flops_fraction: _Optional[float] = ..., path_bits: _Optional[bytes] = ..., path_length: _Optional[int] = ..., layer_departure: _Optional[_Iterable[float]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ScreenResponse(_message.Message):
    __slots__ = ("request_id", "results", "model_name", "model_version", "error", "score_policy")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SCORE_POLICY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[ImageResult]
    model_name: str
    model_version: str
    error: Error
    score_policy: str
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ImageResult, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., score_policy: _Optional[str] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Layer(_message.Message):
    __slots__ = ("name", "filters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    filters: int
    def __init__(self, name: _Optional[str] = ..., filters: _Optional[int] = ...) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("name", "version", "arch", "classes", "input_shape", "threshold", "layers", "path_length", "max_images_per_request", "max_batch_size", "encodings", "dtypes", "metrics", "score_policy")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PATH_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SCORE_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    arch: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    threshold: float
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    path_length: int
    max_images_per_request: int
    max_batch_size: int
    encodings: _containers.RepeatedScalarFieldContainer[str]
    dtypes: _containers.RepeatedScalarFieldContainer[DataType]
    metrics: _containers.ScalarMap[str, float]
    score_policy: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., arch: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., input_shape: _Optional[_Iterable[int]] = ..., threshold: _Optional[float] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., path_length: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., encodings: _Optional[_Iterable[str]] = ..., dtypes: _Optional[_Iterable[_Union[DataType, str]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., score_policy: _Optional[str] = ...) -> None: ...
