"""`pemma bench`: a tiny-preset run of the whole machinery on 2 IBSI cases per site, its
JSON/markdown contract, and the equivalence of the module swaps it profiles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks.speed import monai_reference
from benchmarks.rows import federation_mode_weights, over_seeds
from benchmarks.targets import paired_bootstrap_ci, seed_case_bootstrap_ci, targets
from pemma_core.cli import main
from pemma_core.model.factory import build_model
from pemma_core.model.monai_speed import ChannelInstanceNorm, SdpaWindowAttention
from pemma_core.model.spec import ModelSpec, build_backbone

pytestmark = pytest.mark.slow  # the benchmark on real IBSI data

REPO = Path(__file__).resolve().parents[1]
ROW_IDS = ("ct-backbone", "ct-only", "pet-only", "early-fusion", "pemma-lora", "pemma-dora", "pemma-lora-fed")
EVAL_MODES = {"ct-backbone": {"ct"}, "ct-only": {"ct"}, "pet-only": {"pet"}, "early-fusion": {"ctpet"},
              "pemma-lora": {"ct", "pet", "ctpet"}, "pemma-dora": {"ct", "pet", "ctpet"},
              "pemma-lora-fed": {"ct", "pet", "ctpet"}, "cnn-early-fusion": {"ctpet"}}


def _tiny_bench(ibsi_root: Path, out: Path, *more: str) -> list[str]:
    """``pemma bench`` at the tiny preset: every row, 2 seeds, 2 training cases per site, 2 test cases."""
    return [
        "bench", "--preset", "tiny", "--backbones", "unetr", "--data-root", str(ibsi_root),
        "--pretrain-steps", "2", "--fed-rounds", "1", "--fed-local-steps", "1", "--cnn-steps", "2",
        "--train-cases", "2", "--test-cases", "2", "--speed-steps", "1", "--fed-engine", "inprocess",
        "--threads", "1", "--seeds", "2", "--fed-lora-aggregation", "exact", "--out", str(out), *more,
    ]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory, ibsi_root: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    assert main(_tiny_bench(ibsi_root, out)) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_an_existing_run_is_never_written_over_and_resume_needs_the_same_settings(bench_run, ibsi_root, tmp_path,
                                                                                  capsys):
    out, _ = bench_run
    before = (out / "bench.json").read_bytes()
    assert main(_tiny_bench(ibsi_root, out)) == 1
    assert "refusing to write over another run" in capsys.readouterr().err
    assert main(_tiny_bench(ibsi_root, out, "--resume")) == 1
    assert "is a finished run" in capsys.readouterr().err
    assert (out / "bench.json").read_bytes() == before
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "bench.json").write_text(json.dumps({**json.loads(before), "complete": False}))
    assert main([*_tiny_bench(ibsi_root, stopped, "--resume"), "--cnn-steps", "3"]) == 1
    assert "cnn_steps: 2 there, 3 now" in capsys.readouterr().err
    assert main(_tiny_bench(ibsi_root, tmp_path / "nothing-here", "--resume")) == 1
    assert "no run to continue" in capsys.readouterr().err


def test_resume_runs_only_what_a_stopped_run_lacks(bench_run, ibsi_root, tmp_path):
    out, finished = bench_run
    stopped = tmp_path / "stopped"
    shutil.copytree(out, stopped)
    # As a run stopped during the DoRA row would leave it, with the later sections dropped too, except
    # the timings (the costliest part to run again; they are kept as they were, the sign they were skipped).
    kept = ("ct-backbone", "ct-only", "pet-only", "early-fusion", "pemma-lora", "pemma-lora-fed")
    partial = json.loads(json.dumps(finished))
    entry = partial["backbones"]["unetr"]
    entry["rows"] = [r for r in entry["rows"] if r["row"] in kept]
    for key in ("cnn", "targets", "plots"):
        partial.pop(key, None)
    partial["complete"] = False
    (stopped / "bench.json").write_text(json.dumps(partial))
    backbone = stopped / "backbones" / "unetr-tiny.safetensors"
    stamp = backbone.stat().st_mtime_ns

    assert main(_tiny_bench(ibsi_root, stopped, "--resume")) == 0
    resumed = json.loads((stopped / "bench.json").read_text())
    assert resumed["complete"] and len(resumed["resumed"]) == 1
    assert backbone.stat().st_mtime_ns == stamp  # reloaded, not trained again
    rows = {r["row"]: r for r in resumed["backbones"]["unetr"]["rows"]}
    again = {r["row"]: r for r in finished["backbones"]["unetr"]["rows"]}
    assert set(rows) == set(ROW_IDS)
    for row in kept:
        assert rows[row] == again[row]
    # the rows run again start from the same backbone and seeds: the numbers of the uninterrupted run
    assert rows["pemma-dora"]["dice"] == pytest.approx(again["pemma-dora"]["dice"], abs=1e-6)
    assert resumed["cnn"]["dice"] == pytest.approx(finished["cnn"]["dice"], abs=1e-6)
    assert resumed["backbones"]["unetr"]["speed"] == finished["backbones"]["unetr"]["speed"] and resumed["targets"]


def test_report_only_rewrites_a_finished_run_and_shows_a_stopped_one_without_touching_it(bench_run, tmp_path, capsys):
    out, finished = bench_run
    table = lambda text: [line for line in text.splitlines() if line.startswith("| unetr ")]  # noqa: E731
    written = (out / "BENCHMARKS.md").read_text()
    assert table(written)
    again = tmp_path / "finished"
    shutil.copytree(out, again)
    assert main(["bench", "--report-only", str(again)]) == 0
    assert table((again / "BENCHMARKS.md").read_text()) == table(written)  # the same numbers
    assert json.loads((again / "bench.json").read_text())["report_rewritten"]
    assert "Unfinished run" not in (again / "BENCHMARKS.md").read_text()

    stopped = tmp_path / "stopped"
    shutil.copytree(out, stopped)
    partial = json.loads(json.dumps(finished))
    partial["backbones"]["unetr"]["rows"] = partial["backbones"]["unetr"]["rows"][:3]
    for key in ("cnn", "targets", "plots"):
        partial.pop(key, None)
    partial["complete"] = False
    (stopped / "bench.json").write_text(json.dumps(partial))
    raw = (stopped / "bench.json").read_bytes()
    report = tmp_path / "stopped.md"
    assert main(["bench", "--report-only", str(stopped / "bench.json"), "--report-to", str(report)]) == 0
    assert (stopped / "bench.json").read_bytes() == raw  # only read: --resume continues it as it was
    text = report.read_text()
    assert "**Unfinished run**" in text and "rows done: unetr: ct-backbone, ct-only, pet-only; CNN row not run" in text
    rows_of = lambda text, labels: [line for line in table(text) if any(f"| unetr | {label} |" in line  # noqa: E731
                                                                      for label in labels)]
    done = ("CT backbone (before adaptation)", "CT-only", "PET-only")
    assert rows_of(text, done) == rows_of(written, done) and rows_of(text, done)
    assert not rows_of(text, ("Early fusion (full FT)", "PEMMA-LoRA centralized"))

    (tmp_path / "cut.json").write_text('{"format": ')
    assert main(["bench", "--report-only", str(tmp_path / "cut.json")]) == 1
    assert "cut.json is not JSON" in capsys.readouterr().err


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def test_every_row_has_its_numbers(bench_run):
    _, result = bench_run
    assert result["complete"] and result["format"] == "pemma-bench/1"
    rows = {r["row"]: r for r in result["backbones"]["unetr"]["rows"]}
    assert tuple(rows) == ROW_IDS
    rows["cnn-early-fusion"] = result["cnn"]
    cases = result["data"]["test_cases"]
    assert len(cases) == 2
    for name, row in rows.items():
        assert set(row["dice"]) == EVAL_MODES[name], name
        for mode, value in row["dice"].items():
            assert 0.0 <= value <= 1.0
            assert set(row["per_case"][mode]) == set(cases)
            assert value == pytest.approx(sum(row["per_case"][mode].values()) / len(cases))
        if name != "ct-backbone":  # every other row is trained once per seed; its Dice is the seed mean
            assert [r["seed"] for r in row["per_seed"]] == [0, 1], name
            for mode, value in row["dice"].items():
                assert value == pytest.approx(sum(r["dice"][mode] for r in row["per_seed"]) / 2)
        for key in ("total_params", "trainable_params", "trainable_fraction", "bytes_up_per_round",
                    "seconds_per_step", "peak_memory_bytes", "steps"):
            assert _number(row[key]) and row[key] > 0, (name, key, row[key])
    # Same budget per row; the federated row spends it as rounds x 3 sites x local steps.
    budget = result["backbones"]["unetr"]["budget"]
    assert budget["steps"] == 3
    assert all(rows[r]["steps"] == 3 for r in ROW_IDS[1:])
    assert rows["ct-backbone"]["steps"] == 2
    # PEMMA trains a small fraction and uploads only that; the federated upload is measured.
    assert rows["pemma-lora"]["trainable_fraction"] < 0.2 < rows["early-fusion"]["trainable_fraction"]
    fed = rows["pemma-lora-fed"]
    assert set(fed["bytes_up_per_site"]) == {"ibsi-site-a", "ibsi-site-b", "ibsi-site-c"}
    assert fed["bytes_up_per_site"]["ibsi-site-a"] < fed["bytes_up_per_site"]["ibsi-site-b"]  # CT-only site: fewer groups
    assert [r["round"] for r in fed["per_round"]] == [1]
    assert fed["run_dir"].endswith("fed-unetr-seed0")
    # exact low-rank aggregation ran, and the naive rule's error was measured beside it
    assert fed["lora_aggregation"] == "exact"
    errors = fed["per_round"][0]["lora_naive_error"]
    assert set(errors) >= {"shared", "pet"} and all(0.0 <= e < 1.0 for e in errors.values()), errors
    # the centralized PEMMA rows are the federated row's fair reference: its mode mix, ct steps included
    assert rows["pemma-lora"]["mode_weights"] == pytest.approx({"ct": 7 / 15, "pet": 2 / 15, "ctpet": 6 / 15})
    assert rows["pemma-lora"]["train_data"].startswith("pooled, all sites")
    # The tiny budget (1 step x batch 2) is accepted by the IBSI sites' limits, and the server's robust
    # aggregation keeps every honest update.
    assert fed["sites_failed"] == [] and fed["aggregation"] == "mean"
    assert fed["robust"]["updates"] == 3 and fed["robust"]["rejected"] == 0


def test_speed_profile_targets_and_data_sections(bench_run):
    _, result = bench_run
    entry = result["backbones"]["unetr"]
    for variant in ("pemma-lora", "full-ft"):
        v = entry["speed"]["variants"][variant]
        assert all(_number(v[k]) and v[k] > 0 for k in ("seconds_per_step", "cpu_seconds_per_step", "flops_per_step",
                                                        "tensor_peak_bytes"))
        assert _number(v["peak_memory_bytes"])
    assert entry["speed"]["flops_ratio"] < 1.0  # frozen backbone: no weight gradients
    for variant in ("pemma-lora", "full-ft"):
        assert _number(entry["profile"][variant]["time_ratio_after_before"])
    assert entry["profile"]["pemma-lora"]["before"]["top_ops"]
    assert _number(entry["inference"]["seconds_after"])
    assert _number(result["loading"]["cached_load_s_per_case"])
    names = {t["target"] for t in result["targets"]}
    assert any("early fusion" in n for n in names) and any("forgetting" in n for n in names)
    assert {m for m in ("ct", "pet", "ctpet") if f"Federated PEMMA-LoRA ({m}) within 2 Dice points of centralized" in names} \
        == {"ct", "pet", "ctpet"}  # federated against centralized, per mode
    assert any("step time" in n for n in names) and any("peak memory" in n for n in names)
    for t in result["targets"]:
        assert _number(t["measured"]), t
        assert t["met"] in (True, False, None)
    assert result["data"]["alignment"] and all(0 <= a["pet_mask_vs_ct_mask_dice"] <= 1 for a in result["data"]["alignment"])
    assert isinstance(result["data"]["warnings"], list)


def test_markdown_and_plots(bench_run):
    out, result = bench_run
    text = (out / "BENCHMARKS.md").read_text()
    for heading in ("## Results", "### Dice per test case", "## Targets", "## Forgetting", "## Federated row",
                    "## Speed and memory", "## Profiling", "## Inference and data loading", "## Real data quirks",
                    "## GPU (`--device cuda`)"):
        assert heading in text
    for row in result["backbones"]["unetr"]["rows"]:
        assert row["label"] in text
    assert "Custom run" in text and "Not run here" in text
    assert "loss cross-entropy + soft Dice of the tumour channel" in text
    for path in result["plots"].values():
        assert Path(path).is_file() and Path(path).stat().st_size > 1000
        assert f"(plots/{Path(path).name})" in text
    assert any(k.startswith("overlay-") for k in result["plots"])


def test_bench_evaluation_matches_pemma_evaluate(bench_run):
    """The bench's in-memory test batches give the project's ``evaluate`` Dice (same metric, same windows)."""
    from benchmarks.sites import load_test_batches
    from pemma_core.config.site import load_site_config
    from pemma_core.data.pipeline import eval_loader
    from pemma_core.training.local import evaluate, evaluate_cases

    out, result = bench_run
    test_yaml = out / "sites" / "test.yaml"
    torch.manual_seed(0)
    model = build_model(ModelSpec(backbone="unetr", preset="tiny"))
    ours = evaluate_cases(model, load_test_batches(test_yaml), ["ctpet"], "cpu", overlap=0.25)
    theirs = evaluate(model, eval_loader(load_site_config(test_yaml), split="test"), ["ctpet"])
    assert ours.per_case["ctpet"] == pytest.approx(theirs.per_case["ctpet"], abs=1e-6)


@pytest.mark.parametrize("backbone", ["unetr", "swin-unetr"])
def test_module_swaps_are_equivalent_to_monai(backbone):
    """speed_up_monai_modules changes speed only: outputs and adapter gradients match MONAI's modules."""
    torch.manual_seed(0)
    spec = ModelSpec(backbone=backbone, preset="tiny")
    backbone_net = build_backbone(spec)
    assert any(isinstance(m, ChannelInstanceNorm) for m in backbone_net.modules())
    assert (backbone == "swin-unetr") == any(isinstance(m, SdpaWindowAttention) for m in backbone_net.modules())
    fast = build_model(spec, backbone_net)
    reference = monai_reference(fast)
    assert not any(isinstance(m, (ChannelInstanceNorm, SdpaWindowAttention)) for m in reference.modules())
    image = torch.rand(1, 2, *spec.roi_size, generator=torch.Generator().manual_seed(1))
    for net in (fast, reference):
        net.zero_grad(set_to_none=True)
        net(image, "ctpet").square().mean().backward()
    with torch.no_grad():
        torch.testing.assert_close(fast(image, "ctpet"), reference(image, "ctpet"), rtol=0, atol=1e-4)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    for name, p in fast.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-5)


def test_cuda_request_without_cuda_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on the project's CPU machines
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path / "b")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_paired_bootstrap_interval():
    same = {"a": 0.5, "b": 0.7, "c": 0.2}
    assert paired_bootstrap_ci(same, same) == (0.0, 0.0)
    shifted = {k: v + 0.03 for k, v in same.items()}  # every case 3 points better: no doubt about the gap
    low, high = paired_bootstrap_ci(shifted, same)
    assert low == pytest.approx(3.0) and high == pytest.approx(3.0)
    noisy = {"a": 0.9, "b": 0.7, "c": 0.0}  # one case up 40 points, one down 20: the mean gap (+6.7) is not settled
    low, high = paired_bootstrap_ci(noisy, same)
    assert low < 0.0 < high
    assert paired_bootstrap_ci({"a": 0.5}, {"a": 0.4}) is None  # one shared case: no interval
    assert paired_bootstrap_ci({"a": 0.5, "x": 0.1}, {"a": 0.4, "y": 0.1}) is None  # only shared cases are paired


def test_seed_and_case_bootstrap_covers_training_noise():
    cases = {"a": 0.5, "b": 0.7, "c": 0.2, "d": 0.4}
    # two seeds that agree: the interval is the case bootstrap's, the seeds add nothing
    agree = {0: {k: v + 0.03 for k, v in cases.items()}, 1: {k: v + 0.03 for k, v in cases.items()}}
    assert seed_case_bootstrap_ci(agree, {0: cases}) == pytest.approx((3.0, 3.0))
    # seeds that disagree (+10 and -6 points on every case): the interval spans both
    spread = {0: {k: v + 0.10 for k, v in cases.items()}, 1: {k: v - 0.06 for k, v in cases.items()}}
    low, high = seed_case_bootstrap_ci(spread, {0: cases})
    assert low < 0.0 < high and low == pytest.approx(-6.0) and high == pytest.approx(10.0)
    assert paired_bootstrap_ci({k: v + 0.02 for k, v in cases.items()}, cases) == pytest.approx((2.0, 2.0))


def test_over_seeds_means_and_spread():
    runs = {0: {"dice": {"ct": 0.4}, "per_case": {"ct": {"a": 0.3, "b": 0.5}}},
            1: {"dice": {"ct": 0.6}, "per_case": {"ct": {"a": 0.5, "b": 0.7}}}}
    row = over_seeds([0, 1], lambda seed: dict(runs[seed], label="x"))
    assert row["dice"]["ct"] == pytest.approx(0.5) and row["per_case"]["ct"] == pytest.approx({"a": 0.4, "b": 0.6})
    assert row["dice_seed_sd"]["ct"] == pytest.approx(0.1414, abs=1e-4) and row["label"] == "x"
    assert [r["seed"] for r in row["per_seed"]] == [0, 1]


def test_federation_mode_mix_counts_the_ct_only_site(tmp_path):
    def site(name, modalities):
        path = tmp_path / f"{name}.yaml"
        (tmp_path / "m.csv").write_text("case_id,ct,pet,label,split\n")
        path.write_text(f"name: {name}\nmodalities: [{', '.join(modalities)}]\ndata_root: .\nmanifest: m.csv\n")
        return path

    mix = federation_mode_weights([site("a", ["ct"]), site("b", ["ct", "pet"])])
    assert mix == pytest.approx({"ct": 0.6, "pet": 0.1, "ctpet": 0.3})


def test_targets_flag_gaps_the_test_cases_cannot_settle():
    def row(name, mode, per_case):
        return {"row": name, "label": name, "dice": {mode: sum(per_case.values()) / len(per_case)},
                "per_case": {mode: per_case}}

    central = {"a": 0.60, "b": 0.60, "c": 0.60, "d": 0.60}
    fed_clear = {k: v - 0.10 for k, v in central.items()}
    fed_noisy = {"a": 0.90, "b": 0.30, "c": 0.62, "d": 0.60}  # mean 0.605: met, but the cases disagree
    for fed, met, settled in ((fed_clear, False, True), (fed_noisy, True, False)):
        rows = [row("pemma-lora", "ctpet", central), row("pemma-lora-fed", "ctpet", fed)]
        line = next(t for t in targets({"backbones": {"unetr": {"rows": rows}}})
                    if t["target"].startswith("Federated PEMMA-LoRA (ctpet)"))
        assert line["met"] is met and line["settled"] is settled, line
        assert line["ci95"][0] <= line["measured"] <= line["ci95"][1]


@pytest.mark.parametrize("markdown", ["BENCHMARKS.md", "benchmarks/results/unetr-72-steps/BENCHMARKS.md"])
def test_committed_results_are_where_their_report_links(markdown):
    """Every image and ``bench.json`` a committed report names exists beside it."""
    import re

    page = REPO / markdown
    text = page.read_text()
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert images
    for link in images:
        assert (page.parent / link).is_file(), link
    source = re.search(r"\(`([^`]+\.json)` holds all of them\)", text)
    assert source and (page.parent / source.group(1)).is_file(), source


def test_robust_counts_from_a_run_folders_metrics_json(tmp_path):
    """Clipped, rejected and all updates, and the largest rms / reference, as the federated row reads them."""
    from benchmarks.report import _robust_text
    from benchmarks.robust import robust_counts
    from server.run_dir import RunDir

    site = lambda name, status, **extra: {"name": name, "status": status, **extra}  # noqa: E731
    metrics = {"run": {}, "rounds": [
        {"phase": "adapt", "round": 1, "reference_rms": 0.01, "sites": [
            site("a", "ok", rms={"shared": 0.012, "ct": 0.008}),
            site("b", "clipped", rms={"shared": 0.02}, clip_factor=0.5),
            site("c", "rejected", rms={"shared": 0.011, "pet": 0.09}, reason="outlier"),
            site("d", "failed", reason="refused")]},  # no update: not counted
        {"phase": "adapt", "round": 2, "reference_rms": None, "sites": [  # bound off: no ratio from this round
            site("a", "ok", rms={"shared": 5.0})]},
    ]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    counts = robust_counts(RunDir(tmp_path).metrics()["rounds"], "median", 5.0)
    assert {k: counts[k] for k in ("rule", "outlier_factor", "clipped", "rejected", "updates")} == \
        {"rule": "median", "outlier_factor": 5.0, "clipped": 1, "rejected": 1, "updates": 4}
    assert counts["max_rms_ratio"] == pytest.approx(9.0)
    honest = robust_counts([{"reference_rms": 0.0, "sites": [site("a", "ok", rms={"x": 1.0})]}], "mean", 5.0)  # 0: no ratio
    assert (honest["clipped"], honest["rejected"], honest["updates"], honest["max_rms_ratio"]) == (0, 0, 1, None)
    text = _robust_text({"robust": counts, "examples_per_round": 4, "site_min_examples_per_round": {"a": 2, "b": 2}})
    assert "of 4 honest updates 1 clipped, 1 rejected" in text and "9.00x" in text and "at least 2" in text


def test_bench_site_copies_keep_the_ibsi_limits_and_the_rule_option(tmp_path):
    """The bench's site copies accept its tiny budgets (sites/ibsi limits), and --fed-aggregation reaches the config."""
    import argparse

    from benchmarks.cli import add_arguments
    from benchmarks.config import DEFAULT_SITES_DIR, QUICK_BUDGETS, config_from_args
    from benchmarks.federated import _check_site_limits
    from benchmarks.sites import _write_site_yaml
    from pemma_core.config.run import RunSettings
    from pemma_core.config.site import load_site_config

    original = load_site_config(DEFAULT_SITES_DIR / "site-b.yaml")
    copy = load_site_config(_write_site_yaml(tmp_path / "site-b.yaml", original, original.name, original.modalities,
                                             original.manifest, tmp_path / "cache", "cpu"))
    assert copy.limits == original.limits
    smallest = min(local for _, _, local in QUICK_BUDGETS.values())
    assert copy.limits.refusals(rank=8, pet_embed="lowrank", phase="adapt", local_steps=smallest, batch_size=2) == []
    # A budget under the sites' floor stops the federated row before Flower starts, naming the limit.
    settings = RunSettings(run_dir=str(tmp_path / "run"), site_configs=str(copy.path), local_steps=1, batch_size=1)
    with pytest.raises(ValueError, match=r"limits\.min_examples_per_round in .*site-b\.yaml"):
        _check_site_limits(settings)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--quick"])).fed_aggregation == "mean"
    config = config_from_args(parser.parse_args(["--quick", "--fed-aggregation", "trimmed-mean"]))
    assert config.fed_aggregation == "trimmed-mean" and config.to_json()["fed_aggregation"] == "trimmed-mean"
    with pytest.raises(SystemExit):
        parser.parse_args(["--fed-aggregation", "mode"])


def test_the_long_budget_also_trains_the_federated_row_under_the_naive_rule():
    import argparse

    from benchmarks.cli import add_arguments
    from benchmarks.config import config_from_args
    from benchmarks.runner import compared_lora_rules

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    rules = lambda *argv: compared_lora_rules(config_from_args(parser.parse_args(list(argv))))  # noqa: E731
    assert rules("--budget", "long") == ["naive"]
    assert rules("--budget", "long", "--fed-lora-aggregation", "naive") == []  # the federated row is the naive one
    assert rules() == [] and rules("--quick") == []


def test_the_report_shows_each_federated_rule_with_the_naive_error_per_round(bench_run, tmp_path):
    from benchmarks.report import write_markdown

    _, finished = bench_run
    results = json.loads(json.dumps(finished))
    rows = results["backbones"]["unetr"]["rows"]
    fed = next(r for r in rows if r["row"] == "pemma-lora-fed")
    rows.append({**fed, "row": "pemma-lora-fed-naive", "label": "PEMMA-LoRA federated, naive low-rank aggregation",
                 "lora_aggregation": "naive"})
    write_markdown(results, tmp_path / "BENCHMARKS.md")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    federated = text[text.index("## Federated row"):]
    assert "**unetr, PEMMA-LoRA federated** (low-rank rule exact)" in federated
    assert "**unetr, PEMMA-LoRA federated, naive low-rank aggregation** (low-rank rule naive)" in federated
    errors = fed["per_round"][0]["lora_naive_error"]
    assert errors and all(f"{g} {v:.3g}" in federated for g, v in errors.items())
