"""pemma_core.wire: the wire form of tensors and the checks of what may cross the wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pemma_core import wire

ROI = (32, 32, 32)


def test_float16_transport_roundtrip_widens_to_float32() -> None:
    state = {"a": torch.randn(4, 3), "steps": torch.tensor([7], dtype=torch.int64)}
    sent = wire.to_wire(state, "float16")
    assert sent["a"].dtype == np.float16 and sent["steps"].dtype == np.int64
    assert wire.payload_bytes(sent) == 4 * 3 * 2 + 8
    back = wire.from_wire(sent)
    assert back["a"].dtype == np.float32
    np.testing.assert_allclose(back["a"], state["a"].numpy(), rtol=1e-3, atol=1e-3)
    assert wire.to_tensors(sent)["a"].dtype == torch.float32


def test_float32_transport_is_exact_and_copies() -> None:
    array = np.random.default_rng(0).normal(size=(5,)).astype(np.float32)
    sent = wire.to_wire({"x": array}, "float32")
    assert np.array_equal(sent["x"], array) and sent["x"] is not array


def test_unknown_wire_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="wire-dtype"):
        wire.to_wire({"x": np.zeros(2)}, "bfloat16")


@pytest.mark.parametrize(
    ("shape", "image_like"),
    [
        ((1, 1, 32, 32, 32), True),  # a crop
        ((2, 64, 70, 40), True),  # an image with channels
        ((48, 1, 16, 16, 16), False),  # UNETR patch embedding kernel
        ((1, 8, 48), False),  # positional embedding
        ((16, 48), False),
    ],
)
def test_looks_like_image(shape: tuple[int, ...], image_like: bool) -> None:
    assert wire.looks_like_image(shape, ROI) is image_like


def test_payload_problems_names_each_violation() -> None:
    arrays = {"lora.a": np.zeros((4, 8)), "stolen": np.zeros((1, 1, 40, 40, 40))}
    metrics = {"loss": 0.5, "dice-ct": 0.7, "examples-shared": 4, "case-007": 1.0}
    config = {"site": "site-1", "path": "/data/case-007.nii.gz"}
    problems = wire.payload_problems(arrays, ["lora.a"], ROI, metrics, config, case_ids=["case-007"])
    text = "\n".join(problems)
    assert "'stolen' is not one of the tensors the server sent" in text
    assert "image-like shape" in text
    assert "metric 'case-007' is not an aggregate metric name" in text
    assert "config entry 'path' may not cross the wire" in text
    assert "case id ('case-007')" in text
    with pytest.raises(wire.WireViolation, match="refused"):
        wire.assert_clean(arrays, ["lora.a"], ROI, metrics, config)


def test_clean_payload_passes() -> None:
    metrics = {"loss": 0.5, "num-examples": 4, "train-seconds": 1.5, "bytes-up": 128, "dice-ctpet": 0.6, "cases-ctpet": 2}
    assert wire.payload_problems({"a": np.zeros((3, 3))}, ["a", "b"], ROI, metrics, {"site": "s", "fingerprint": "f"}) == []
    prognosis = {"loss": 0.4, "c-index": 0.7, "cases-survival": 2, "events-survival": 3, "examples-prognosis": 3}
    assert wire.payload_problems({}, [], ROI, prognosis, {"site": "s", "fingerprint": "f"}) == []
    ehr_stats = {"site": "s", "ehr-stats": "{}"}
    assert wire.payload_problems({}, [], ROI, {}, ehr_stats, config_keys=wire.EHR_STATS_REPLY_KEYS) == []
    # only the reply to query.ehr_stats may hold ehr-stats
    assert wire.payload_problems({}, [], ROI, prognosis, ehr_stats) == ["config entry 'ehr-stats' may not cross the wire"]
    assert wire.payload_problems({}, [], ROI, {"risk-case-007": 1.2}, {}) != []  # no per-patient risk
