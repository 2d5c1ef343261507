"""HD95, surface Dice and the HECKTOR aggregated Dice: per case, per site, and pooled by the server."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from pemma_core import protocol
from pemma_core.model.factory import build_model
from pemma_core.model.spec import ModelSpec, build_backbone
from pemma_core.protocol import EVALUATE, Instruction, Reply
from pemma_core.training import seg_metrics
from pemma_core.training.local import evaluate, evaluate_cases
from pemma_core.training.seg_metrics import aggregated_dice, case_metrics, pooled_dice, spacing_of_affine
from server.roster import Member, Roster
from server.strategy import PemmaStrategy
from simulation.inprocess import InProcessGrid

SHAPE = (16, 16, 16)


def _voxel(x: int, y: int = 8, z: int = 8) -> np.ndarray:
    mask = np.zeros(SHAPE, np.int64)
    mask[x, y, z] = 1
    return mask


def _random_cases(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (prediction, label) pairs of boxes of different sizes and offsets, all non-empty."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        label, pred = np.zeros(SHAPE, np.int64), np.zeros(SHAPE, np.int64)
        lo, size = rng.integers(1, 5, size=3), rng.integers(2, 9, size=3)
        label[tuple(slice(a, a + s) for a, s in zip(lo, size))] = 1
        shift = rng.integers(-2, 3, size=3)
        pred[tuple(slice(max(0, a + d), a + d + s) for a, d, s in zip(lo, shift, size))] = 1
        cases.append((pred, label))
    return cases


# ----------------------------------------------------------------------------- one case


@pytest.mark.parametrize("k", [1, 3])
def test_hd95_of_a_voxel_shifted_by_k_is_k_and_scales_with_spacing(k: int) -> None:
    pred, label = _voxel(4 + k), _voxel(4)
    assert case_metrics(pred, label).hd95 == pytest.approx(k)
    assert case_metrics(pred, label, spacing=(2.0, 1.0, 1.0)).hd95 == pytest.approx(2 * k)  # the shift is along axis 0
    assert case_metrics(pred, label, spacing=(1.0, 3.0, 3.0)).hd95 == pytest.approx(k)
    # surface Dice: every surface point is exactly k away, so it counts at tolerance k and not below
    assert case_metrics(pred, label, tolerance=k).nsd == pytest.approx(1.0)
    assert case_metrics(pred, label, tolerance=k - 0.5).nsd == pytest.approx(0.0)
    scores = case_metrics(pred, label)
    assert (scores.intersection, scores.volume_sum) == (0, 2)


def test_identical_and_shifted_boxes() -> None:
    box = np.zeros(SHAPE, np.int64)
    box[3:9, 3:9, 3:9] = 1
    same = case_metrics(box, box)
    assert (same.hd95, same.nsd, same.intersection, same.volume_sum, same.dice) == (0.0, 1.0, 216, 432, 1.0)
    moved = np.roll(box, 2, axis=2)  # a 6^3 box moved by 2 voxels: 6*6*4 voxels in common
    scores = case_metrics(moved, box)
    assert (scores.intersection, scores.volume_sum) == (144, 432)
    assert scores.dice == pytest.approx(2 * 144 / 432)
    assert 0 < scores.hd95 <= 2.0  # no surface point is more than 2 voxels from the other surface
    assert case_metrics(moved, box, tolerance=2.0).nsd == pytest.approx(1.0)


def test_hd95_and_surface_dice_are_monais_from_one_surface_distance_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice, hausdorff_distance, surface_dice
    from monai.metrics import utils as monai_utils

    passes = []
    edge_distances = monai_utils.get_edge_surface_distance

    def counted(*args, **kwargs):
        passes.append(1)
        return edge_distances(*args, **kwargs)

    for module in (monai_utils, hausdorff_distance, surface_dice):  # wherever MONAI's metrics look it up
        monkeypatch.setattr(module, "get_edge_surface_distance", counted)
    for (pred, label), spacing in zip(_random_cases(6, seed=3), [None, (1.0, 1.0, 1.0), (2.0, 0.7, 3.1)] * 2):
        p, g = torch.as_tensor(pred == 1), torch.as_tensor(label == 1)
        one_hot = [torch.stack([~m, m])[None].float() for m in (p, g)]
        space = None if spacing is None else [list(spacing)]
        passes.clear()
        scores = case_metrics(pred, label, spacing=spacing, tolerance=1.5)
        assert len(passes) == 1  # HD95 and surface Dice share MONAI's edges and distances
        passes.clear()
        hd = float(compute_hausdorff_distance(*one_hot, percentile=95, spacing=space)[0, 0])
        nsd = float(compute_surface_dice(*one_hot, class_thresholds=[1.5], spacing=space)[0, 0])
        assert scores.hd95 == pytest.approx(hd, rel=1e-6)
        assert scores.nsd == pytest.approx(nsd, rel=1e-6)


def test_empty_masks_have_a_decided_value_and_never_a_non_finite_one() -> None:
    empty, label = np.zeros(SHAPE, np.int64), _voxel(5)
    missed = case_metrics(empty, label)
    assert (missed.hd95, missed.nsd, missed.intersection, missed.volume_sum, missed.dice) == (None, 0.0, 0, 1, 0.0)
    spurious = case_metrics(label, empty)
    assert (spurious.hd95, spurious.nsd) == (None, 0.0)
    both = case_metrics(empty, empty)
    assert (both.hd95, both.nsd, both.intersection, both.volume_sum, both.dice) == (0.0, 1.0, 0, 0, 1.0)
    # a case with one undefined class is undefined, not the mean of its other classes
    three = np.zeros(SHAPE, np.int64)
    three[5, 8, 8], three[10, 8, 8] = 1, 2
    only_one = np.where(three == 1, 1, 0)
    assert case_metrics(only_one, three, classes=3).hd95 is None
    assert case_metrics(three, three, classes=3).hd95 == 0.0
    assert seg_metrics.mean_defined([None, 2.0, float("inf"), 4.0]) == (3.0, 2)
    assert seg_metrics.mean_defined([None]) == (None, 0)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="spacing must be three"):
        case_metrics(_voxel(1), _voxel(2), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        case_metrics(_voxel(1), _voxel(2), tolerance=float("nan"))
    with pytest.raises(ValueError, match="class map"):
        case_metrics(np.zeros((2, 4, 4, 4)), np.zeros((2, 4, 4, 4)))


def test_spacing_of_an_affine_ignores_rotation_and_flips() -> None:
    theta = 0.3
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.5, 2.0, 3.0])
    affine[:3, 3] = [10, -20, 5]
    assert spacing_of_affine(affine) == pytest.approx((1.5, 2.0, 3.0))
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        spacing_of_affine(np.eye(3))
    with pytest.raises(ValueError, match="spacing"):
        spacing_of_affine(np.diag([1.0, 0.0, 1.0, 1.0]))


# ----------------------------------------------------------------------------- aggregated Dice


def test_aggregated_dice_weights_cases_by_size_and_equals_the_pooled_volume() -> None:
    big_label = np.zeros(SHAPE, np.int64)
    big_label[2:12, 2:12, 2:4] = 1  # 200 voxels
    big_pred = big_label.copy()
    big_pred[2:4, 2:12, 2:4] = 0  # predicts 160 of them
    small_label, small_pred = _voxel(3) + _voxel(4), _voxel(4) + _voxel(5) + _voxel(6)  # 2 and 3 voxels, 1 shared
    big, small = case_metrics(big_pred, big_label), case_metrics(small_pred, small_label)
    assert (big.intersection, big.volume_sum, small.intersection, small.volume_sum) == (160, 360, 1, 5)
    agg = aggregated_dice([(big.intersection, big.volume_sum), (small.intersection, small.volume_sum)])
    assert agg == pytest.approx((320 + 2) / (360 + 5))
    mean = (big.dice + small.dice) / 2
    assert agg != pytest.approx(mean, abs=0.05)  # the small case pulls the mean down, not the aggregate
    # pooling the cases into one volume (side by side, apart) gives the same number
    pooled_pred, pooled_label = np.concatenate([big_pred, small_pred], 0), np.concatenate([big_label, small_label], 0)
    both = case_metrics(pooled_pred, pooled_label, surface=False)
    assert agg == pytest.approx(both.dice) and (both.hd95, both.nsd) == (None, None)


def test_aggregated_dice_of_nothing_and_of_impossible_counts() -> None:
    assert aggregated_dice([(0, 0), (0, 0)]) is None
    assert aggregated_dice([(0, 0), (2, 4)]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="impossible"):
        aggregated_dice([(3, 5)])
    with pytest.raises(ValueError, match="impossible"):
        pooled_dice(7, 6)


# ----------------------------------------------------------------------------- evaluate_cases


def _model():
    torch.manual_seed(0)
    spec = ModelSpec(preset="tiny")
    return build_model(spec, build_backbone(spec))


def _batches(spec: ModelSpec, n: int, spacing: float | None) -> list[dict]:
    g = torch.Generator().manual_seed(4)
    s = spec.roi_size[0]
    out = []
    for i in range(n):
        batch = {"image": torch.randn(1, 2, s, s, s, generator=g),
                 "label": (torch.rand(1, 1, s, s, s, generator=g) > 0.7).long(), "case_id": [f"c{i}"]}
        if spacing is not None:
            batch["grid_affine"] = torch.diag(torch.tensor([spacing, spacing, spacing, 1.0], dtype=torch.float64))[None]
        out.append(batch)
    return out


def test_evaluate_cases_adds_surface_metrics_and_overlap_sums() -> None:
    model = _model()
    batches = _batches(model.spec, 3, spacing=1.0)
    result = evaluate(model, batches, ["ct", "ctpet"])
    assert result.distance_unit == "mm" and result.nsd_tolerance == seg_metrics.NSD_TOLERANCE_MM
    for mode in ("ct", "ctpet"):
        cases = result.case_metrics[mode]
        assert set(cases) == {"c0", "c1", "c2"}
        for case_id, scores in cases.items():  # Dice from the counts is MONAI's Dice of the case
            assert scores.dice == pytest.approx(result.per_case[mode][case_id], abs=1e-6)
        assert result.overlap[mode] == sum(2 * c.intersection for c in cases.values())
        assert result.volume[mode] == sum(c.volume_sum for c in cases.values())
        assert result.agg_dice[mode] == pytest.approx(aggregated_dice((c.intersection, c.volume_sum) for c in cases.values()))
        hd = [c.hd95 for c in cases.values() if c.hd95 is not None]
        assert result.hd95_cases[mode] == len(hd)
        assert result.hd95[mode] == (pytest.approx(np.mean(hd)) if hd else None)
        assert result.nsd[mode] == pytest.approx(np.mean([c.nsd for c in cases.values()]))
    assert any(c.hd95 is not None for c in result.case_metrics["ct"].values())  # the check below has cases to check
    # the same predictions on a grid of 2 mm voxels: HD95 doubles
    doubled = evaluate_cases(model, _batches(model.spec, 3, spacing=2.0), ["ct"])
    for case_id, scores in result.case_metrics["ct"].items():
        other = doubled.case_metrics["ct"][case_id]
        assert (other.intersection, other.volume_sum) == (scores.intersection, scores.volume_sum)
        assert (other.hd95 is None) == (scores.hd95 is None)
        if scores.hd95 is not None:
            assert other.hd95 == pytest.approx(2 * scores.hd95)


def test_evaluate_cases_without_a_grid_counts_in_voxels_and_refuses_a_mix() -> None:
    model = _model()
    plain = evaluate_cases(model, _batches(model.spec, 1, spacing=None), ["ct"], surface=False)
    assert plain.distance_unit == "voxel" and plain.hd95 == {"ct": None} and plain.nsd == {"ct": None}
    assert plain.volume["ct"] > 0
    mixed = _batches(model.spec, 1, spacing=1.0) + _batches(model.spec, 1, spacing=None)
    with pytest.raises(ValueError, match="grid_affine"):
        evaluate_cases(model, mixed, ["ct"])


def test_evaluate_cases_with_an_empty_prediction_does_not_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    from pemma_core.training import local

    model = _model()
    batch = _batches(model.spec, 1, spacing=1.0)[0]
    monkeypatch.setattr(local, "_predict", lambda m, image, *a, **k: torch.zeros_like(batch["label"]))  # background only
    result = evaluate_cases(model, [batch], ["ct"])
    scores = result.case_metrics["ct"]["c0"]
    assert scores.hd95 is None and scores.nsd == 0.0 and scores.intersection == 0
    assert result.hd95 == {"ct": None} and result.hd95_cases == {"ct": 0} and result.agg_dice == {"ct": 0.0}
    assert result.per_case["ct"]["c0"] == 0.0


# ----------------------------------------------------------------------------- the wire and the server


def test_protocol_ranges_of_the_new_metrics() -> None:
    assert [protocol.metric_range(n) for n in ("hd95-ct", "nsd-pet", "overlap-ctpet", "volume-ct", "hd95-cases-ct")] == [
        "distance", "fraction", "count", "count", "count"]
    good = {"dice-ct": 0.5, "cases-ct": 2, "hd95-ct": 3.5, "hd95-cases-ct": 2, "nsd-ct": 0.7, "overlap-ct": 10,
            "volume-ct": 30}
    meta = {protocol.SITE: "s", protocol.FINGERPRINT: "fp"}
    assert protocol.reply_problems(EVALUATE, Reply({}, good, meta), [], (32, 32, 32)) == []
    for name, value, problem in [("hd95-ct", -1.0, "outside"), ("hd95-ct", float("inf"), "not finite"),
                                 ("nsd-ct", 1.5, "outside"), ("overlap-ct", 2.5, "not a whole number"),
                                 ("volume-ct", -4, "not a count"), ("hd95-case-7-ct", 1.0, "not an aggregate")]:
        problems = protocol.reply_problems(EVALUATE, Reply({}, {**good, name: value}, meta), [], (32, 32, 32))
        assert any(problem in p for p in problems), (name, problems)


@pytest.fixture(autouse=True)
def _task_identity(flower_identity: None) -> None:
    """Tests here build Flower messages."""


def _strategy(*names: str) -> PemmaStrategy:
    roster = Roster(timeout=1.0)
    for node, name in enumerate(names, start=1):
        roster.members[node] = Member(node, name, {"ct": 10, "pet": 10, "ehr": 0, "survival": 0}, label=name)
    instruction = Instruction(local_steps=1, lr=0.1, batch_size=1, seed=0, spec=ModelSpec(), fingerprint="fp")
    state = {"lora": np.zeros((4, 3), np.float32)}
    strategy = PemmaStrategy("adapt", state, {"lora": "shared"}, (32, 32, 32), instruction, roster=roster, min_sites=1,
                             max_update_norm=None, wire_dtype="float32")
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), InProcessGrid(None, [{}] * len(names))))
    return strategy


def _eval_reply(node: int, site: str, metrics: dict) -> Message:
    content = RecordDict({"arrays": ArrayRecord({}), "metrics": MetricRecord(metrics),
                          "meta": ConfigRecord({"site": site, "fingerprint": "fp"})})
    return Message(content=content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="evaluate"))


def _site_metrics(cases: list[seg_metrics.CaseMetrics], dice: list[float], mode: str = "ct") -> dict:
    """What evaluate_site sends for one mode, from the site's cases."""
    hd95, defined = seg_metrics.mean_defined(c.hd95 for c in cases)
    out = {f"dice-{mode}": float(np.mean(dice)), f"cases-{mode}": len(cases), f"hd95-cases-{mode}": defined,
           f"nsd-{mode}": float(np.mean([c.nsd for c in cases])),
           f"overlap-{mode}": sum(2 * c.intersection for c in cases), f"volume-{mode}": sum(c.volume_sum for c in cases)}
    if hd95 is not None:
        out[f"hd95-{mode}"] = hd95
    return out


def test_the_server_pools_two_sites_sums_into_the_pooled_case_values() -> None:
    cases = [case_metrics(p, g) for p, g in _random_cases(5, seed=2)]
    cases.append(case_metrics(np.zeros(SHAPE, np.int64), _voxel(7)))  # a missed tumour: no HD95, NSD 0
    a, b = cases[:2], cases[2:]
    strategy = _strategy("a", "b")
    result = strategy.aggregate_evaluate(1, [_eval_reply(1, "a", _site_metrics(a, [c.dice for c in a])),
                                             _eval_reply(2, "b", _site_metrics(b, [c.dice for c in b]))])
    metrics = dict(result)
    assert metrics["agg-dice-ct"] == pytest.approx(aggregated_dice((c.intersection, c.volume_sum) for c in cases), abs=1e-12)
    assert metrics["hd95-ct"] == pytest.approx(np.mean([c.hd95 for c in cases if c.hd95 is not None]))
    assert metrics["nsd-ct"] == pytest.approx(np.mean([c.nsd for c in cases]))
    assert metrics["dice-ct"] == pytest.approx(np.mean([c.dice for c in cases]))
    assert metrics["agg-dice-ct"] != pytest.approx(metrics["dice-ct"], abs=1e-3)
    record = strategy._current.to_json()
    assert record["eval_metrics"] == metrics
    by_name = {s["name"]: s for s in record["sites"]}
    assert by_name["a"]["seg"]["ct"]["agg-dice"] == pytest.approx(aggregated_dice((c.intersection, c.volume_sum) for c in a))
    assert set(by_name["b"]["seg"]["ct"]) == {"agg-dice", "hd95", "nsd"}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"overlap-ct": 40, "volume-ct": 30}, "exceeds volume-ct"),
        ({"overlap-ct": 11}, "is odd"),
        ({"volume-ct": None}, "must come together"),
        ({"hd95-cases-ct": 3}, "exceeds cases-ct"),
        ({"hd95-cases-ct": 0}, "over hd95-cases-ct = 0"),
        ({"hd95-ct": None}, "no hd95-ct"),
        ({"hd95-cases-ct": None}, "without hd95-cases-ct"),
        ({"nsd-pet": 0.5}, "without a Dice"),
        ({"nsd-ct": 1.2}, "outside [0, 1]"),
    ],
)
def test_a_nonsensical_reply_is_rejected_with_its_reason(change: dict, problem: str) -> None:
    good = {"dice-ct": 0.5, "cases-ct": 2, "hd95-ct": 3.5, "hd95-cases-ct": 2, "nsd-ct": 0.7, "overlap-ct": 10,
            "volume-ct": 30}
    bad = {k: v for k, v in {**good, **change}.items() if v is not None}
    strategy = _strategy("honest", "odd")
    result = strategy.aggregate_evaluate(1, [_eval_reply(1, "honest", good), _eval_reply(2, "odd", bad)])
    assert dict(result)["agg-dice-ct"] == pytest.approx(10 / 30)  # the honest site's sums only
    site = {s.name: s for s in strategy._current.sites.values()}["odd"]
    assert site.status == "rejected" and problem in site.reason and site.dice == {}


def test_a_reply_without_the_new_metrics_still_counts() -> None:
    strategy = _strategy("old", "new")
    new = {"dice-ct": 0.4, "cases-ct": 1, "hd95-cases-ct": 0, "nsd-ct": 0.0, "overlap-ct": 0, "volume-ct": 8}
    metrics = dict(strategy.aggregate_evaluate(1, [_eval_reply(1, "old", {"dice-ct": 0.6, "cases-ct": 3}),
                                                   _eval_reply(2, "new", new)]))
    assert metrics == {"dice-ct": pytest.approx((0.6 * 3 + 0.4) / 4), "agg-dice-ct": 0.0, "nsd-ct": 0.0}


# ----------------------------------------------------------------------------- pemma evaluate and the report


def test_pemma_evaluate_pools_sites_and_prints_every_metric() -> None:
    from simulation.evaluate import format_table, overall

    result = {"run": "r", "round": 2, "split": "test", "sites": {"a": {"ct": 0.9}, "b": {"ct": 0.2, "pet": 0.5}},
              "cases": {"a": {"ct": 1}, "b": {"ct": 1, "pet": 2}}, "agg_dice": {"a": {"ct": 0.9}, "b": {"ct": 0.2, "pet": 0.5}},
              "hd95": {"a": {"ct": 1.5}, "b": {"ct": None, "pet": 4.0}}, "hd95_cases": {"a": {"ct": 1}, "b": {"ct": 0, "pet": 2}},
              "nsd": {"a": {"ct": 0.95}, "b": {"ct": 0.0, "pet": 0.6}}, "overlap": {"a": {"ct": 180}, "b": {"ct": 2, "pet": 5}},
              "volume": {"a": {"ct": 200}, "b": {"ct": 10, "pet": 10}}, "distance_unit": "mm", "nsd_tolerance": 2.0}
    result["overall"] = overall(result)
    assert result["overall"]["ct"] == {"agg_dice": pytest.approx(182 / 210), "overlap": 182, "volume": 210, "cases": 2}
    assert result["overall"]["pet"]["agg_dice"] == pytest.approx(0.5)
    table = format_table(result)
    assert "HD95 mm" in table and "0.867" in table and "1.50" in table and "all sites" in table
    lines = [line for line in table.splitlines() if line.startswith("b ") and " ct " in line]
    assert len(lines) == 1 and lines[0].split()[5] == "-"  # b's undefined HD95 in ct


def test_the_report_shows_the_segmentation_table() -> None:
    from server.report import _segmentation_section

    metrics = {"rounds": [{"phase": "adapt", "round": 1, "eval_metrics": {"dice-ct": 0.5, "agg-dice-ct": 0.6,
                                                                         "hd95-ct": 4.25, "nsd-ct": 0.7},
                           "sites": [{"name": "a", "dice": {"ct": 0.5}, "seg": {"ct": {"agg-dice": 0.6, "nsd": 0.7}}}]}]}
    text = "\n".join(_segmentation_section(metrics))
    assert "| 1 | all | ct | 0.500 | 0.600 | 4.25 | 0.700 |" in text
    assert "| 1 | a | ct | 0.500 | 0.600 | - | 0.700 |" in text
    assert _segmentation_section({"rounds": [{"phase": "adapt", "round": 1, "eval_metrics": {"dice-ct": 0.5}}]}) == []
