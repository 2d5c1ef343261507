"""pemma_core.protocol: message types, instructions, what each reply may hold, the wire form of tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pemma_core import protocol
from pemma_core.model.spec import ModelSpec
from pemma_core.protocol import EHR_STATS, EVALUATE, INSTALL_BACKBONE, JOIN, TRAIN, Instruction, Reply

ROI = (32, 32, 32)
META = {"site": "site-1", "fingerprint": "f00d"}


def test_float16_transport_roundtrip_widens_to_float32() -> None:
    state = {"a": torch.randn(4, 3), "steps": torch.tensor([7], dtype=torch.int64)}
    sent = protocol.to_wire(state, "float16")
    assert sent["a"].dtype == np.float16 and sent["steps"].dtype == np.int64
    assert protocol.payload_bytes(sent) == 4 * 3 * 2 + 8
    back = protocol.from_wire(sent)
    assert back["a"].dtype == np.float32
    np.testing.assert_allclose(back["a"], state["a"].numpy(), rtol=1e-3, atol=1e-3)
    assert protocol.to_tensors(sent)["a"].dtype == torch.float32


def test_float32_transport_is_exact_and_copies() -> None:
    array = np.random.default_rng(0).normal(size=(5,)).astype(np.float32)
    sent = protocol.to_wire({"x": array}, "float32")
    assert np.array_equal(sent["x"], array) and sent["x"] is not array


def test_unknown_wire_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="wire-dtype"):
        protocol.to_wire({"x": np.zeros(2)}, "bfloat16")


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
    assert protocol.looks_like_image(shape, ROI) is image_like


def test_message_types_are_flowers_strings() -> None:
    assert [TRAIN[p].name for p in protocol.PHASES] == ["train.pretrain_ct", "train", "train.prognosis"]
    assert (JOIN.name, INSTALL_BACKBONE.name, EHR_STATS.name, EVALUATE.name) == (
        "query.join", "query.install_backbone", "query.ehr_stats", "evaluate")
    assert [stage.name for stage in protocol.SECAGG_STAGES] == [
        "query.secagg_keys", "query.secagg_shares", "query.secagg_confirm", "query.secagg_unmask"]
    assert set(protocol.REPLIES) == {JOIN, INSTALL_BACKBONE, EHR_STATS, EVALUATE, *TRAIN.values(), *protocol.SECAGG_STAGES}


def test_instruction_roundtrip_and_the_spec_as_json() -> None:
    spec = ModelSpec(rank=4, survival=True, ehr_features=3)
    sent = Instruction(local_steps=3, lr=0.01, seed=7, spec=spec, fingerprint="f00d", ehr_preprocessor={"k": "v"},
                       phase="prognosis", round=4, wire_dtype="float16")
    config = sent.to_config()
    # the order Flower's ConfigRecord keeps; batch-size (None) is left out
    assert list(config) == ["local-steps", "lr", "seed", "model-spec", "fingerprint", "ehr-preprocessor", "phase", "round",
                            "wire-dtype"]
    assert config["model-spec"] == spec.to_json() and ModelSpec.from_json(config["model-spec"]) == spec
    assert Instruction.from_config(config) == sent
    assert protocol.read_install_config(protocol.install_config(spec, "f00d")) == (spec, "f00d")


def test_an_instruction_missing_an_entry_is_refused_by_name() -> None:
    config = Instruction(local_steps=1, lr=0.1, batch_size=2, seed=0, spec=ModelSpec(), fingerprint="f", phase="adapt",
                         round=1, wire_dtype="float32").to_config()
    del config["batch-size"], config["fingerprint"]
    with pytest.raises(ValueError, match="lacks 'batch-size', 'fingerprint'"):
        Instruction.from_config(config)
    with pytest.raises(ValueError, match="unknown phase"):
        Instruction.from_config({**config, "phase": "finetune"})
    with pytest.raises(ValueError, match="lacks 'fingerprint'"):
        protocol.read_install_config({"model-spec": ModelSpec().to_json()})


def test_reply_problems_names_each_violation() -> None:
    arrays = {"lora.a": np.zeros((4, 8)), "stolen": np.zeros((1, 1, 40, 40, 40))}
    metrics = {"loss": 0.5, "examples-shared": 4, "case-007": 1.0}
    meta = {"site": "site-1", "path": "/data/case-007.nii.gz"}
    problems = protocol.reply_problems(TRAIN["adapt"], Reply(arrays, metrics, meta), ["lora.a"], ROI, case_ids=["case-007"])
    text = "\n".join(problems)
    assert "'stolen' is not one of the tensors the server sent" in text
    assert "image-like shape" in text
    assert "metric 'case-007' is not an aggregate metric name" in text
    assert "config entry 'path' may not cross the wire" in text
    assert "case id ('case-007')" in text
    with pytest.raises(protocol.WireViolation, match="refused"):
        protocol.check_reply(TRAIN["adapt"], Reply(arrays, metrics, meta), ["lora.a"], ROI)


@pytest.mark.parametrize(
    ("kind", "metrics", "meta"),
    [
        (TRAIN["pretrain-ct"], {"num-examples": 2, "examples-backbone": 2, "loss": 0.5, "steps": 1, "train-seconds": 1.5,
                                "setup-seconds": 0.1, "bytes-up": 128}, {"site": "s"}),
        (TRAIN["adapt"], {"num-examples": 4, "loss": 0.5, "examples-shared": 4, "examples-ct": 4, "bytes-up": 128}, META),
        (TRAIN["prognosis"], {"loss": 0.4, "c-index": 0.7, "cases-survival": 2, "events-survival": 3,
                              "examples-prognosis": 3, "examples-ehr": 3}, META),
        (TRAIN["prognosis"], {"loss": 0.4, "c-index": 0.75, "c-score": 9, "c-pairs": 6, "cases-survival": 4}, META),
        (EVALUATE, {"num-examples": 2, "eval-seconds": 0.3, "dice-ctpet": 0.6, "cases-ctpet": 2, "dice-ct": 0.5}, META),
        (EHR_STATS, {}, {"site": "s", "ehr-stats": "{}"}),
        (INSTALL_BACKBONE, {}, META),
    ],
)
def test_each_kind_of_reply_passes_with_what_it_may_hold(kind, metrics: dict, meta: dict) -> None:
    arrays = {"a": np.zeros((3, 3), dtype=np.float32)} if protocol.REPLIES[kind].tensors else {}
    assert protocol.reply_problems(kind, Reply(arrays, metrics, meta), ["a", "b"], ROI, case_ids=["case-007"]) == []


@pytest.mark.parametrize("counts", [{"c-score": 13, "c-pairs": 6, "cases-survival": 4},  # score above 2 x pairs
                                    {"c-score": 2, "c-pairs": 7, "cases-survival": 4},  # 4 cases make 6 pairs
                                    {"c-score": 2, "c-pairs": 1},  # without its case count
                                    {"c-index": 0.9, "c-score": 9, "c-pairs": 6, "cases-survival": 4}])  # 9 / 12 is 0.75
def test_c_index_pair_counts_that_cannot_be_are_refused(counts: dict) -> None:
    problems = protocol.reply_problems(TRAIN["prognosis"], Reply({}, {"loss": 0.4, **counts}, META), [], ROI)
    assert len(problems) == 1 and "c-score" in problems[0], problems


B = protocol.BOOTSTRAP_REPLICATES
COUNTS = {"loss": 0.4, "c-index": 0.75, "c-score": 9, "c-pairs": 6, "cases-survival": 4}


def test_bootstrap_counts_travel_as_two_lists_of_counts() -> None:
    boot = {"c-boot-scores": [9] * (B - 1) + [0], "c-boot-pairs": [6] * (B - 1) + [0]}
    assert protocol.reply_problems(TRAIN["prognosis"], Reply({}, {**COUNTS, **boot}, META), [], ROI) == []


@pytest.mark.parametrize(("boot", "says"), [
    ({"c-boot-scores": [9] * B}, "come together"),
    ({"c-boot-scores": [9] * (B - 1), "c-boot-pairs": [6] * (B - 1)}, f"list of {B} counts"),
    ({"c-boot-scores": [13] * B, "c-boot-pairs": [6] * B}, "no pair counts of 4"),  # score above 2 x pairs
    ({"c-boot-scores": [2] * B, "c-boot-pairs": [7] * B}, "no pair counts of 4"),  # 4 cases make 6 pairs
    ({"c-boot-scores": [9.5] * B, "c-boot-pairs": [6] * B}, "not a whole number"),
    ({"c-boot-scores": [9] * B, "c-boot-pairs": "6"}, f"list of {B} counts"),
])
def test_bootstrap_counts_that_cannot_be_are_refused(boot: dict, says: str) -> None:
    problems = protocol.reply_problems(TRAIN["prognosis"], Reply({}, {**COUNTS, **boot}, META), [], ROI)
    assert any(says in p for p in problems), problems


def test_bootstrap_counts_need_the_counts_they_resample() -> None:
    boot = {"c-boot-scores": [0] * B, "c-boot-pairs": [0] * B}
    problems = protocol.reply_problems(TRAIN["prognosis"], Reply({}, {"loss": 0.4, **boot}, META), [], ROI)
    assert problems == ["c-score, c-pairs and cases-survival come together, as whole numbers"]
    problems = protocol.reply_problems(TRAIN["adapt"], Reply({}, {"loss": 0.4, **boot}, META), [], ROI)
    assert any("'c-boot-scores' is not an aggregate metric name" in p for p in problems), problems


def test_what_a_reply_may_hold_depends_on_its_kind() -> None:
    # only the reply to query.ehr_stats may hold ehr-stats
    stats = Reply(meta={"site": "s", "ehr-stats": "{}"})
    assert protocol.reply_problems(TRAIN["adapt"], stats, [], ROI) == ["config entry 'ehr-stats' may not cross the wire"]
    # an evaluate reply holds no tensor, even one the server sent; a train reply no Dice
    assert protocol.reply_problems(EVALUATE, Reply({"a": np.zeros(3)}, {}, META), ["a"], ROI) == [
        "tensor 'a' is not one of the tensors the server sent"
    ]
    assert protocol.reply_problems(TRAIN["adapt"], Reply({}, {"dice-ct": 0.5}, META), [], ROI) == [
        "metric 'dice-ct' is not an aggregate metric name"
    ]
    assert protocol.reply_problems(TRAIN["adapt"], Reply({}, {"loss": True}, META), [], ROI) == ["metric 'loss' is not a number (bool)"]


@pytest.mark.parametrize(
    "name",
    ["loss-case-007", "loss\n", "lossy", "examples-case", "examples-shared-007", "dice-ct-case-007", "cases-survival-7",
     "c-index-case-007", "risk-case-007", "LOSS"],
)
def test_a_metric_name_that_only_starts_like_an_allowed_one_is_refused(name: str) -> None:
    for kind in (TRAIN["adapt"], TRAIN["prognosis"], EVALUATE):
        problems = protocol.reply_problems(kind, Reply({}, {name: 1.0}, META), [], ROI)
        assert problems == [f"metric {name!r} is not an aggregate metric name"], kind


@pytest.mark.parametrize("kind", [TRAIN["pretrain-ct"], TRAIN["adapt"], TRAIN["prognosis"], EVALUATE, EHR_STATS])
@pytest.mark.parametrize("entry", ["site", "fingerprint", "ehr-stats", "metric"])
def test_a_case_id_is_found_in_any_config_value_and_metric_name(kind, entry: str) -> None:
    """A case id anywhere in a metric name or config value refuses the reply, whatever its kind."""
    meta = dict(META)
    metrics: dict[str, float] = {}
    if entry == "metric":
        metrics["loss-STS_003"] = 0.1
    elif entry == "ehr-stats":
        meta["ehr-stats"] = json.dumps({"categories": {"sex": ["F", "STS_003"]}})
    else:
        meta[entry] = "x-STS_003-y"
    problems = protocol.reply_problems(kind, Reply({}, metrics, meta), [], ROI, case_ids=["STS_001", "STS_003"])
    assert "a case id ('STS_003') appears in the message" in problems
    assert protocol.reply_problems(kind, Reply({}, {}, META), [], ROI, case_ids=["STS_001", "STS_003", ""]) == []


def test_counts_and_dice_are_read_back_as_they_are_written() -> None:
    metrics = {**protocol.examples_metrics({"shared": 4, "ct": 2}), "dice-ct": 0.5, "cases-ct": 3, "dice-pet": 0.25,
               "examples-odd": 1.5}
    assert list(protocol.examples_metrics({"shared": 4, "ct": 2})) == ["examples-ct", "examples-shared"]
    assert protocol.examples_of(metrics) == {"shared": 4, "ct": 2}
    assert protocol.dice_of(metrics) == {"ct": (0.5, 3), "pet": (0.25, 1)}


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("loss", [0.1, 0.2], "is a list; a reply holds one number per metric"),
        ("loss", {"a": 1}, "is a dict"),
        ("loss", float("nan"), "is not finite"),
        ("loss", -0.5, "outside [0, inf]"),
        ("loss", "0.5", "is not a number (str)"),
        ("loss", True, "is not a number (bool)"),
        ("dice-ct", 1e6, "outside [0, 1]"),
        ("dice-ct", -1.4, "outside [0, 1]"),
        ("c-index", 1.01, "outside [0, 1]"),
        ("num-examples", 2.5, "not a whole number"),
        ("examples-shared", -1, "is not a count"),
        ("examples-shared", 10**30, "is not a count"),
        ("train-seconds", float("inf"), "is not finite"),
        ("train-seconds", 1e12, "outside [0, 1e+07]"),
    ],
)
def test_metric_values_are_checked_by_type_and_range(name: str, value: object, problem: str) -> None:
    found = protocol.metric_value_problem(name, value)
    assert found is not None and problem in found and repr(name) in found
    kind = EVALUATE if name.startswith("dice-") else TRAIN["prognosis"]  # a kind of reply that may hold it
    reply = Reply(metrics={name: value}, meta={"site": "s"})
    assert any(problem in p for p in protocol.reply_problems(kind, reply, (), ROI))


@pytest.mark.parametrize(("name", "value"), [("loss", 0.0), ("dice-ctpet", 1.0), ("c-index", 0.5), ("num-examples", 20),
                                             ("examples-pet", np.int64(7)), ("eval-seconds", 3), ("cases-ct", 0)])
def test_honest_metric_values_pass(name: str, value: object) -> None:
    assert protocol.metric_value_problem(name, value) is None


def test_a_site_refuses_instruction_keys_the_protocol_does_not_name() -> None:
    config = Instruction(local_steps=3, lr=0.01, batch_size=2, seed=7, spec=ModelSpec(), fingerprint="f",
                         phase="adapt", round=1, wire_dtype="float32").to_config()
    assert Instruction.from_config({**config, "server-round": 1}).round == 1  # Flower's own key is fine
    with pytest.raises(ValueError, match="unknown key.*'eval-split'.*does not take"):
        Instruction.from_config({**config, "eval-split": "train"})


def test_join_reply_declares_training_cases() -> None:
    metrics = protocol.declared_metrics({"ct": 10, "pet": 7})
    assert metrics == {"train-cases-ct": 10, "train-cases-pet": 7, "train-cases-ehr": 0, "train-cases-survival": 0}
    assert protocol.reply_problems(JOIN, Reply(metrics=metrics, meta={"site": "a"}), (), ROI) == []
    assert protocol.declared_of(metrics)["pet"] == 7
    bad = Reply(metrics={"train-cases-ct": -3}, meta={"site": "a", "fingerprint": "x"})
    problems = protocol.reply_problems(JOIN, bad, (), ROI)
    assert any("is not a count" in p for p in problems) and any("'fingerprint' may not cross" in p for p in problems)


# ----------------------------------------------------------------------------- int8 transport


def _int8_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Floating tensors whose size is not a multiple of the block (a partial last block), and a counter."""
    return {"lora": (rng.normal(size=(5, 37)) * 3).astype(np.float32), "bias": np.zeros(3, dtype=np.float32),
            "count": np.array([7], dtype=np.int64)}


def _block_bound(array: np.ndarray) -> np.ndarray:
    """Per element: absmax of its block / 127 / 2, the promised int8 rounding error."""
    flat = array.astype(np.float64).ravel()
    blocks = np.pad(flat, (0, -flat.size % protocol.INT8_BLOCK)).reshape(-1, protocol.INT8_BLOCK)
    return np.repeat(np.abs(blocks).max(axis=1) / 127 / 2, protocol.INT8_BLOCK)[: flat.size].reshape(array.shape)


def test_int8_transport_roundtrip_is_within_half_a_step_per_block() -> None:
    state = _int8_state(np.random.default_rng(0))
    sent = protocol.to_wire(state, "int8")
    assert set(sent) == {"lora", "lora::absmax", "bias", "bias::absmax", "count"}
    assert sent["lora"].dtype == np.int8 and sent["lora"].shape == (5, 37)
    assert sent["lora::absmax"].dtype == np.float32 and sent["lora::absmax"].shape == (-(-5 * 37 // protocol.INT8_BLOCK),)
    assert sent["count"].dtype == np.int64 and sent["count"][0] == 7  # counters are not quantised
    back = protocol.from_wire(sent)
    assert set(back) == set(state) and back["lora"].dtype == np.float32
    error = np.abs(back["lora"].astype(np.float64) - state["lora"])
    assert np.all(error <= _block_bound(state["lora"]) * (1 + 1e-5))
    assert error.max() > 0  # really quantised, not passed through
    np.testing.assert_array_equal(back["bias"], 0)  # an all-zero block stays exactly zero
    assert protocol.payload_bytes(sent) < protocol.payload_bytes(protocol.to_wire(state, "float32")) / 3
    tensors = protocol.to_tensors(sent)
    assert set(tensors) == set(state) and tensors["lora"].dtype == torch.float32


def test_a_federated_average_of_int8_updates_is_within_the_bound_of_the_float32_average() -> None:
    rng = np.random.default_rng(1)
    updates = [(rng.normal(size=(8, 40)) * scale).astype(np.float32) for scale in (0.5, 1.0, 2.0)]
    weights = np.array([3.0, 1.0, 2.0]) / 6.0
    exact = sum(w * u.astype(np.float64) for w, u in zip(weights, updates, strict=True))
    received = [protocol.from_wire(protocol.to_wire({"x": u}, "int8"))["x"].astype(np.float64) for u in updates]
    average = sum(w * r for w, r in zip(weights, received, strict=True))
    bound = sum(w * _block_bound(u) for w, u in zip(weights, updates, strict=True))
    assert np.all(np.abs(average - exact) <= bound * (1 + 1e-5))


def test_int8_refuses_non_finite_tensors_and_int8_state_tensors() -> None:
    with pytest.raises(ValueError, match="'x'.*NaN"):
        protocol.to_wire({"x": np.array([1.0, np.nan], dtype=np.float32)}, "int8")
    with pytest.raises(ValueError, match="'c' is int8"):
        protocol.to_wire({"c": np.zeros(2, dtype=np.int8)}, "float32")
    with pytest.raises(ValueError, match="reserved"):
        protocol.to_wire({"x::absmax": np.zeros(2, dtype=np.float32)}, "float32")


def _malformed(sent: dict[str, np.ndarray], fault: str) -> dict[str, np.ndarray]:
    out = dict(sent)
    if fault == "missing scales":
        del out["lora::absmax"]
    elif fault == "wrong length":
        out["lora::absmax"] = out["lora::absmax"][:-1]
    elif fault == "NaN scales":
        out["lora::absmax"] = np.full_like(out["lora::absmax"], np.nan)
    elif fault == "negative scales":
        out["lora::absmax"] = -out["lora::absmax"]
    elif fault == "stray scales":
        del out["lora"]
    elif fault == "scales of a float tensor":
        out["lora"] = out["lora"].astype(np.float32)
    return out


@pytest.mark.parametrize(("fault", "problem"), [
    ("missing scales", "int8 tensor 'lora' travels without its scales 'lora::absmax'"),
    ("wrong length", "expected float32 of shape (3,)"),
    ("NaN scales", "are not all finite and >= 0"),
    ("negative scales", "are not all finite and >= 0"),
    ("stray scales", "scales 'lora::absmax' travel without their tensor 'lora'"),
    ("scales of a float tensor", "come with tensor 'lora' of dtype float32, expected int8"),
])
def test_a_malformed_int8_reply_is_refused(fault: str, problem: str) -> None:
    sent = protocol.to_wire(_int8_state(np.random.default_rng(2)), "int8")
    reply = Reply(_malformed(sent, fault), {"num-examples": 1}, {"site": "site-1"})
    problems = protocol.reply_problems(TRAIN["adapt"], reply, ["lora", "bias", "count"], ROI)
    assert len(problems) == 1 and problem in problems[0], problems
    with pytest.raises(ValueError, match="malformed wire form"):
        protocol.from_wire(reply.arrays)


def test_int8_scales_are_accepted_only_for_tensors_the_server_sent() -> None:
    sent = protocol.to_wire(_int8_state(np.random.default_rng(3)), "int8")
    reply = Reply(sent, {"num-examples": 1}, {"site": "site-1"})
    # The server checks against its own keys; a site against what it received, scales included.
    assert protocol.reply_problems(TRAIN["adapt"], reply, ["lora", "bias", "count"], ROI) == []
    assert protocol.reply_problems(TRAIN["adapt"], reply, sent.keys(), ROI) == []
    problems = protocol.reply_problems(TRAIN["adapt"], reply, ["bias", "count", "lora::absmax"], ROI)
    assert problems == ["tensor 'lora' is not one of the tensors the server sent",
                        "scales 'lora::absmax' are not the scales of a tensor the server sent"]


def test_int8_is_a_wire_dtype_of_the_run_settings() -> None:
    from pemma_core.config.run import RunSettings

    assert protocol.check_wire_dtype("int8") == "int8"
    assert RunSettings(wire_dtype="int8").wire_dtype == "int8"
