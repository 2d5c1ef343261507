"""Flower records <-> the plain dictionaries of :mod:`pemma_core.protocol`, for both apps.

:mod:`pemma_core.protocol` says what a message holds, in numpy arrays and dictionaries
(``pemma_core`` never imports flwr). This module is the only code that packs those into
Flower's ``ArrayRecord`` / ``ConfigRecord`` / ``MetricRecord`` / ``RecordDict`` and
unpacks them. The site (:mod:`client`) imports it too: it is the one module of
``server/`` the ClientApp uses (the project's top-level layout has no third app package),
and it imports nothing else of the server.
"""

from __future__ import annotations

import functools
import io
import math
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SType

from pemma_core import protocol
from pemma_core.protocol import ARRAYS, CONFIG, META, METRICS, MessageType, Reply


# An Array travels as the bytes ``np.save`` writes (Flower's numpy serialisation): a header naming the
# dtype and shape, then the raw data. numpy writes and parses a header in Python (``repr`` and
# ``ast.literal_eval``, a tenth of a millisecond), and a round moves hundreds of tensors of a few forms
# per site: each form's header is written or read by numpy once per process and kept (by its bytes,
# a bounded number of short ones: they come from the sites), the data copied as it is.
_NPY = np.lib.format
_NPY_MAGIC = b"\x93NUMPY"
_HEADERS_KEPT, _HEADER_KEPT_BYTES = 1024, 4096


@functools.lru_cache(maxsize=_HEADERS_KEPT)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    _NPY.write_array_header_1_0(buffer, {"descr": _NPY.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def to_array(value: np.ndarray) -> Array:
    """``value`` as a Flower Array: the bytes ``Array(value)`` would hold for a C-ordered array of a
    plain dtype (any other array: as ``Array(value)`` makes it)."""
    value = np.asarray(value)
    if not value.dtype.isbuiltin or value.dtype.hasobject:
        return Array(value)
    try:
        header = _npy_header(value.dtype, value.shape)
    except ValueError:  # a header too long for format 1.0: numpy picks the version
        return Array(value)
    data = (value if value.flags.c_contiguous else value.copy(order="C")).tobytes()
    return Array(dtype=str(value.dtype), shape=value.shape, stype=SType.NUMPY, data=header + data)


def _header_size(data: bytes) -> int | None:
    """Bytes of the .npy preamble and header of ``data`` (format 1.0 or 2.0), None for another."""
    if data[:6] != _NPY_MAGIC or len(data) < 12 or data[6] not in (1, 2) or data[7] != 0:
        return None
    return 10 + struct.unpack_from("<H", data, 8)[0] if data[6] == 1 else 12 + struct.unpack_from("<I", data, 8)[0]


def _read_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of a .npy header, read by numpy."""
    buffer = io.BytesIO(header)
    version = _NPY.read_magic(buffer)
    read = _NPY.read_array_header_1_0 if version == (1, 0) else _NPY.read_array_header_2_0
    return read(buffer)


_read_kept_header = functools.lru_cache(maxsize=_HEADERS_KEPT)(_read_header)


def to_numpy(array: Array) -> np.ndarray:
    """The numpy array an Array holds, as ``Array.numpy()`` reads it (a new, writable array).

    Raises ``ValueError`` for bytes that are not a numpy array without objects: another
    serialisation type, a header numpy cannot read, an object dtype, data shorter than the header says.
    """
    if array.stype != SType.NUMPY:
        raise ValueError(f"serialised as {array.stype!r}, not {SType.NUMPY!r}")
    data = array.data
    size = _header_size(data) if isinstance(data, bytes) else None
    if size is None or size > len(data):  # not the form np.save writes for plain arrays: numpy decides
        return np.load(io.BytesIO(data), allow_pickle=False)
    header = data[:size]
    shape, fortran, dtype = (_read_kept_header if size <= _HEADER_KEPT_BYTES else _read_header)(header)
    if dtype.hasobject:
        raise ValueError(f"an array of dtype {dtype} (only pickle could load it)")
    if any(n < 0 for n in shape):  # (np.frombuffer would read a count of -1 as "all the data")
        raise ValueError(f"negative dimensions are not allowed: shape {shape}")
    values = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=size)
    return values.reshape(shape, order="F" if fortran else "C").copy()


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Arrays as an ArrayRecord, as given (convert to the wire form first: :func:`protocol.to_wire`)."""
    return ArrayRecord({name: to_array(value) for name, value in arrays.items()})


def _decoded(record: ArrayRecord) -> tuple[dict[str, np.ndarray], list[str]]:
    """(the arrays that decode, a problem naming each tensor that does not)."""
    arrays, problems = {}, []
    for name, array in record.items():
        try:
            arrays[name] = to_numpy(array)
        except Exception as exc:  # noqa: BLE001 - the bytes are the sender's: any failure is its message's fault
            problems.append(f"tensor {name!r} does not decode ({type(exc).__name__}: {exc})")
    return arrays, problems


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord's arrays exactly as sent (dtype kept: checks see the wire form); ``ValueError``
    naming each tensor that does not decode."""
    arrays, problems = _decoded(record)
    if problems:
        raise ValueError("; ".join(problems))
    return arrays


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's serialised arrays, as they travel."""
    return int(sum(len(array.data) for array in record.values()))


def instruction(arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> RecordDict:
    """The content of a message to a site: tensors and config."""
    return RecordDict({ARRAYS: to_record(arrays), CONFIG: ConfigRecord(dict(config))})


def read_instruction(msg: Message) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, config) of a message to a site; either may be empty."""
    arrays = from_record(msg.content.array_records.get(ARRAYS, ArrayRecord()))
    return arrays, dict(msg.content.config_records.get(CONFIG, ConfigRecord()))


def reply_message(msg: Message, reply: Reply) -> Message:
    """The Flower reply to ``msg`` carrying ``reply``."""
    content = RecordDict(
        {ARRAYS: to_record(reply.arrays), METRICS: MetricRecord(dict(reply.metrics)), META: ConfigRecord(dict(reply.meta))}
    )
    return Message(content=content, reply_to=msg)


def read_reply(msg: Message) -> tuple[Reply, list[str]]:
    """A site's reply, and what is wrong with it: its records (a reply holds exactly
    :data:`protocol.REPLY_RECORDS`; missing ones read as empty) and each tensor that does not
    decode (left out of the reply)."""
    content = msg.content
    problems = [f"reply lacks its {key!r} record" for key in protocol.REPLY_RECORDS if key not in content]
    problems += [f"unexpected record {key!r} in reply" for key in sorted(set(content.keys()) - set(protocol.REPLY_RECORDS))]
    arrays, undecodable = _decoded(content.array_records.get(ARRAYS, ArrayRecord()))
    problems += undecodable
    reply = Reply(
        arrays=arrays,
        metrics=reply_metrics(msg),
        meta=dict(content.config_records.get(META, ConfigRecord())),
    )
    return reply, problems


def reply_metrics(msg: Message) -> dict[str, Any]:
    """A reply's metrics alone (no tensor decoded: for a reply whose whole content was read and checked already)."""
    return dict(msg.content.metric_records.get(METRICS, MetricRecord()))


def reply_config(msg: Message) -> dict[str, Any]:
    """A reply's config entries alone (no tensor decoded)."""
    return dict(msg.content.config_records.get(META, ConfigRecord()))


def reply_bytes(msg: Message) -> int:
    """Bytes of the tensors a reply carries, as they travelled."""
    return record_bytes(msg.content.array_records.get(ARRAYS, ArrayRecord()))


def handles(app: ClientApp, message_type: MessageType) -> Callable:
    """The decorator registering a ClientApp handler for ``message_type``
    (``@handles(app, protocol.EVALUATE)`` is ``@app.evaluate()``)."""
    return getattr(app, message_type.category)(message_type.action)


__all__ = [
    "from_record",
    "handles",
    "instruction",
    "read_instruction",
    "read_reply",
    "record_bytes",
    "reply_bytes",
    "reply_config",
    "reply_metrics",
    "reply_message",
    "to_array",
    "to_numpy",
    "to_record",
]
