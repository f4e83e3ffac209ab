from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ItemErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_ERROR_CODE_UNSPECIFIED: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_NOT_FOUND: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_INVALID_VALUE: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_UNREADABLE: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_TOKEN_SPACE_EXHAUSTED: _ClassVar[ItemErrorCode]
ITEM_ERROR_CODE_UNSPECIFIED: ItemErrorCode
ITEM_ERROR_CODE_NOT_FOUND: ItemErrorCode
ITEM_ERROR_CODE_INVALID_VALUE: ItemErrorCode
ITEM_ERROR_CODE_UNREADABLE: ItemErrorCode
ITEM_ERROR_CODE_TOKEN_SPACE_EXHAUSTED: ItemErrorCode

class TokenizeRequest(_message.Message):
    __slots__ = ("collection", "values")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    collection: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TokenizeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[TokenizeResult, _Mapping]]] = ...) -> None: ...

class TokenizeResult(_message.Message):
    __slots__ = ("token", "error")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    token: str
    error: ItemError
    def __init__(self, token: _Optional[str] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class DetokenizeRequest(_message.Message):
    __slots__ = ("collection", "tokens")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class DetokenizeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DetokenizeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DetokenizeResult, _Mapping]]] = ...) -> None: ...

class DetokenizeResult(_message.Message):
    __slots__ = ("value", "error", "masked")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    value: str
    error: ItemError
    masked: bool
    def __init__(self, value: _Optional[str] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ..., masked: _Optional[bool] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("collection", "tokens")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DeleteResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DeleteResult, _Mapping]]] = ...) -> None: ...

class DeleteResult(_message.Message):
    __slots__ = ("deleted", "error")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    error: ItemError
    def __init__(self, deleted: _Optional[bool] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ItemErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ItemErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...
