"""What crosses the wire between a site and the server, and the checks that keep it so.

DESIGN.md section 1: a site sends the adapter tensors it trained, a count of examples
per parameter group and aggregate metrics; nothing else. This module is the single
place that says what "nothing else" means, used on both ends (the client checks before
it replies, the server checks every reply it receives):

* tensors: only names from the key set the server sent (the global adapters, or the
  backbone during ``pretrain-ct``), and no tensor shaped like an image or a label
  (trailing three dimensions at least as large as the model's crop, see
  :func:`looks_like_image`);
* metrics: only names matching :data:`METRIC_KEY` (loss, Dice per mode, the C-index of a
  site's held-out split, counts, seconds, bytes), numbers only, and never a string naming
  a case;
* reply config: only :data:`REPLY_CONFIG_KEYS` (the site's name, the fingerprint of the
  backbone it used) and, in the reply to ``query.ehr_stats`` only
  (:data:`EHR_STATS_REPLY_KEYS`), :data:`EHR_STATS_KEY`: the JSON of
  :func:`pemma_core.clinical.partial_stats`, aggregates of its training rows: counts,
  sums, centred sums of squares, category sets; no row, and checked for case ids.

It also converts tensors to and from their wire form: ``float32`` or ``float16``
(``wire-dtype``) on the wire, always ``float32`` once received so the server averages in
full precision. Pure numpy/torch: no flwr import (``pemma_core`` never imports flwr).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

WIRE_DTYPES: dict[str, type[np.floating[Any]]] = {"float32": np.float32, "float16": np.float16}

# Names a reply's MetricRecord may use. Groups and modes are lower-case words.
METRIC_KEY = re.compile(
    r"^(?:num-examples|steps|loss|train-seconds|setup-seconds|eval-seconds|bytes-up"
    r"|examples-[a-z]+|dice-(?:ct|pet|ctpet)|cases-(?:ct|pet|ctpet)"
    r"|c-index|cases-survival|events-survival)$"
)
REPLY_CONFIG_KEYS: frozenset[str] = frozenset({"site", "fingerprint"})
EHR_STATS_KEY = "ehr-stats"
EHR_STATS_REPLY_KEYS: frozenset[str] = REPLY_CONFIG_KEYS | {EHR_STATS_KEY}  # the reply to query.ehr_stats


class WireViolation(RuntimeError):
    """A message would carry (or carried) something other than adapters, counts and metrics."""


def check_wire_dtype(name: str) -> str:
    if name not in WIRE_DTYPES:
        raise ValueError(f"unknown wire-dtype {name!r}: expected one of {', '.join(WIRE_DTYPES)}")
    return name


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy()
    return np.asarray(value)


def to_wire(state: Mapping[str, torch.Tensor | np.ndarray], wire_dtype: str = "float32") -> dict[str, np.ndarray]:
    """Tensors as numpy arrays in their wire form.

    Floating tensors are cast to ``wire_dtype``; integer tensors (e.g. a counter buffer)
    travel unchanged. Arrays are copied, so the caller's tensors are never aliased.
    """
    dtype = WIRE_DTYPES[check_wire_dtype(wire_dtype)]
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        array = _as_numpy(value)
        out[name] = array.astype(dtype, copy=True) if np.issubdtype(array.dtype, np.floating) else array.copy()
    return out


def from_wire(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Received arrays with every floating one widened to ``float32`` (what the server averages in)."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        array = np.asarray(value)
        out[name] = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
    return out


def to_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Received arrays as float32 torch tensors, ready for ``load_trainable_state``."""
    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in from_wire(arrays).items()}


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of tensor data (what dominates a message's size)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def looks_like_image(shape: Sequence[int], roi_size: Sequence[int]) -> bool:
    """True if ``shape`` could hold an image, a label or a crop of either.

    Everything a model learns here is smaller than its input crop in at least one of the
    three trailing dimensions (the largest kernel is UNETR's 16^3 patch embedding; the
    smallest crop is 32^3), while any image, label or crop is at least the crop size in
    all three.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        return False
    return all(s >= r for s, r in zip(shape[-3:], roi_size, strict=True))


def payload_problems(
    arrays: Mapping[str, Any],
    allowed_keys: Iterable[str],
    roi_size: Sequence[int],
    metrics: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    case_ids: Iterable[str] = (),
    config_keys: Iterable[str] = REPLY_CONFIG_KEYS,
) -> list[str]:
    """Reasons a message's content is not "adapters, counts and aggregate metrics only".

    ``arrays`` maps names to anything with a ``shape`` (numpy arrays, torch tensors, or
    flwr ``Array`` objects); ``allowed_keys`` is the key set the server sent; ``case_ids``
    (optional, known at a site) are searched for in every metric name and config value;
    ``config_keys``: the config entries this kind of reply may hold
    (:data:`EHR_STATS_REPLY_KEYS` for the reply to ``query.ehr_stats``).
    """
    problems: list[str] = []
    allowed = set(allowed_keys)
    for name, value in arrays.items():
        if name not in allowed:
            problems.append(f"tensor {name!r} is not one of the tensors the server sent")
        shape = tuple(getattr(value, "shape", ()))
        if looks_like_image(shape, roi_size):
            problems.append(f"tensor {name!r} has an image-like shape {shape}")
    for key, value in (metrics or {}).items():
        if not METRIC_KEY.match(key):
            problems.append(f"metric {key!r} is not an aggregate metric name")
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            problems.append(f"metric {key!r} is not numeric")
    config_keys = frozenset(config_keys)
    for key, value in (config or {}).items():
        if key not in config_keys:
            problems.append(f"config entry {key!r} may not cross the wire")
        if not isinstance(value, str):
            problems.append(f"config entry {key!r} is not a string")
    texts = [*(metrics or {}).keys(), *(str(v) for v in (config or {}).values())]
    for case_id in case_ids:
        if case_id and any(case_id in text for text in texts):
            problems.append(f"a case id ({case_id!r}) appears in the message")
    return problems


def assert_clean(
    arrays: Mapping[str, Any],
    allowed_keys: Iterable[str],
    roi_size: Sequence[int],
    metrics: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    case_ids: Iterable[str] = (),
    where: str = "message",
    config_keys: Iterable[str] = REPLY_CONFIG_KEYS,
) -> None:
    """Raise :class:`WireViolation` listing every problem :func:`payload_problems` finds."""
    problems = payload_problems(arrays, allowed_keys, roi_size, metrics, config, case_ids, config_keys)
    if problems:
        raise WireViolation(f"{where} refused: " + "; ".join(problems))


__all__ = [
    "EHR_STATS_KEY",
    "EHR_STATS_REPLY_KEYS",
    "METRIC_KEY",
    "REPLY_CONFIG_KEYS",
    "WIRE_DTYPES",
    "WireViolation",
    "assert_clean",
    "check_wire_dtype",
    "from_wire",
    "looks_like_image",
    "payload_bytes",
    "payload_problems",
    "to_tensors",
    "to_wire",
]
