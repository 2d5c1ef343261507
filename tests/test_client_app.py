"""Client side: which site a node serves, refusing a backbone with another fingerprint, checking every reply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client import site_work, task
from pemma_core.config.site import load_site_config
from pemma_core.model.files import backbone_fingerprint, save_backbone
from pemma_core.model.spec import ModelSpec, build_backbone
from pemma_core.protocol import EHR_STATS, EVALUATE, TRAIN, Reply, WireViolation, reply_meta


@pytest.fixture()
def site_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "site-a.yaml"
    path.write_text("name: site-a\ndata_root: .\nmodalities: [ct]\nmanifest: manifest.csv\n")
    return path


def test_site_config_from_node_config_or_partition(tmp_path: Path, site_yaml: Path) -> None:
    assert site_work.site_config_path({"site-config": str(site_yaml)}, {}) == site_yaml
    other = tmp_path / "other.yaml"
    listed = {"site-configs": f"{site_yaml}, {other}"}
    assert site_work.site_config_path({"partition-id": 1, "num-partitions": 2}, listed) == other
    with pytest.raises(ValueError, match="only 2 site config"):
        site_work.site_config_path({"partition-id": 2}, listed)
    with pytest.raises(ValueError, match="site-config"):
        site_work.site_config_path({}, {})


def test_a_simulated_node_without_site_configs_serves_the_phantom_federation(tmp_path: Path) -> None:
    run_config = {"site-configs": "", "federation-dir": str(tmp_path / "fed"), "phantom-sites": 2, "phantom-cases": 1, "seed": 0}
    second = site_work.site_config_path({"partition-id": 1, "num-partitions": 2}, run_config)  # the first node writes it
    assert second == (tmp_path / "fed" / "site-2" / "site.yaml").resolve() and second.is_file()
    assert site_work.site_config_path({"partition-id": 0, "num-partitions": 2}, run_config).parent.name == "site-1"
    with pytest.raises(ValueError, match="only 2 site config"):
        site_work.site_config_path({"partition-id": 2}, run_config)


def test_ct_only_site_may_send_only_shared_and_ct(site_yaml: Path) -> None:
    site = load_site_config(site_yaml)
    assert site_work.site_modes(site) == ["ct"]
    assert task.allowed_groups(site) == {"shared", "ct"}


def test_backbone_with_another_fingerprint_is_refused(tmp_path: Path, site_yaml: Path) -> None:
    spec = ModelSpec()
    site = load_site_config(site_yaml)
    torch.manual_seed(0)
    server_backbone = build_backbone(spec)
    server_fp = backbone_fingerprint(server_backbone)
    arrays = {k: v.numpy() for k, v in server_backbone.state_dict().items()}
    torch.manual_seed(1)
    own = tmp_path / "own.safetensors"
    save_backbone(own, build_backbone(spec), spec)
    with pytest.raises(task.BackboneMismatchError, match="refusing to join"):
        task.install_backbone(site, {"backbone-file": str(own)}, arrays, spec, server_fp)
    with pytest.raises(task.BackboneMismatchError, match="refusing to train"):
        task.site_backbone(site, {"backbone-file": str(own)}, server_fp)
    # Tensors altered in transit do not match the announced fingerprint either.
    tampered = dict(arrays)
    key = next(k for k, v in tampered.items() if v.dtype == np.float32)
    tampered[key] = tampered[key] + 1.0
    with pytest.raises(task.BackboneMismatchError, match="corrupted"):
        task.install_backbone(site, {}, tampered, spec, server_fp)
    # The genuine one is kept in the site's cache, found again by fingerprint.
    assert task.install_backbone(site, {}, arrays, spec, server_fp) == server_fp
    assert (site.cache_dir / "backbones" / f"{server_fp}.safetensors").is_file()
    task._BACKBONES.clear()
    assert backbone_fingerprint(task.site_backbone(site, {}, server_fp)) == server_fp


def test_every_reply_is_searched_for_the_sites_case_ids(tmp_path: Path, site_yaml: Path) -> None:
    """The client-side check knows the site's case ids (its manifest), for every kind of reply."""
    (tmp_path / "manifest.csv").write_text("case_id,split,label,ct\ncase-007,train,l.nii.gz,c.nii.gz\n")
    site = load_site_config(site_yaml)
    assert site_work.site_case_ids(site) == ["case-007"]
    roi = ModelSpec().roi_size
    clean = Reply({}, {"loss": 0.1}, reply_meta(site.name, "f00d"))
    assert site_work.check_reply(TRAIN["adapt"], clean, {}, roi, site) is clean
    for kind in (TRAIN["pretrain-ct"], TRAIN["adapt"], TRAIN["prognosis"], EVALUATE, EHR_STATS):
        with pytest.raises(WireViolation, match="case id \\('case-007'\\)"):
            site_work.check_reply(kind, Reply({}, {}, reply_meta(site.name, "f00d-case-007")), {}, roi, site)


def _with_limits(site_yaml: Path, **limits: object) -> Path:
    """A copy of ``site_yaml`` (beside it) whose ``limits:`` block is ``limits``."""
    import yaml

    data = yaml.safe_load(site_yaml.read_text())
    data["limits"] = dict(limits)
    copy = site_yaml.with_name(f"limits-{abs(hash(tuple(sorted(limits.items()))))}.yaml")
    copy.write_text(yaml.safe_dump(data))
    return copy


def _instruction(phase: str = "adapt", **changes: object):
    from pemma_core.protocol import Instruction

    values = dict(local_steps=10, lr=0.01, batch_size=2, seed=0, spec=ModelSpec(), fingerprint="f", phase=phase, round=1,
                  wire_dtype="float32")
    values.update(changes)
    return Instruction(**values)


@pytest.mark.parametrize(
    ("changes", "limit"),
    [({"spec": ModelSpec(rank=64)}, "limits.max_rank"), ({"spec": ModelSpec(pet_embed="full")}, "limits.pet_embed"),
     ({"local_steps": 1, "batch_size": 1}, "limits.min_examples_per_round")],
)
def test_a_site_refuses_requests_outside_its_limits(site_yaml: Path, changes: dict, limit: str) -> None:
    site = load_site_config(site_yaml)
    site_work.refuse_outside_limits(site, _instruction())  # the default run is within the default limits
    with pytest.raises(site_work.RequestRefused, match=f"site-a refuses this request: .*{limit} in {site_yaml}"):
        site_work.refuse_outside_limits(site, _instruction(**changes))
    with pytest.raises(site_work.RequestRefused, match="limits.max_upload_mb"):
        site_work.refuse_large_upload(site, {"w": np.zeros((65, 1024, 256), np.float32)})  # 65 MiB


def test_dice_over_fewer_test_cases_than_the_floor_is_withheld(phantom_federation) -> None:
    """A site evaluates, but reports a mode's Dice only over at least min_eval_cases test cases, and says so."""
    from pemma_core.model.factory import build_model
    from pemma_core.model.files import trainable_state

    source = phantom_federation.site_yamls[1]  # CT+PET, 1 test case
    spec = ModelSpec()
    torch.manual_seed(0)
    backbone = build_backbone(spec)
    fingerprint = backbone_fingerprint(backbone)
    arrays = {k: v.numpy() for k, v in trainable_state(build_model(spec, backbone)).items()}
    for floor, reported in ((1, True), (3, False)):
        site = load_site_config(_with_limits(source, min_eval_cases=floor))
        task.install_backbone(site, {}, {k: v.numpy() for k, v in backbone.state_dict().items()}, spec, fingerprint)
        reply = task.evaluate_site(site, {}, _instruction(fingerprint=fingerprint), arrays)
        assert any(k.startswith("dice-") for k in reply.metrics) is reported
        assert ("withheld" in reply.meta) is not reported
        for mode in (k.removeprefix("dice-") for k in list(reply.metrics) if k.startswith("dice-")):
            # beside Dice: the surface metrics (in mm: eval_loader batches carry their grid) and the overlap sums
            assert {f"nsd-{mode}", f"hd95-cases-{mode}", f"overlap-{mode}", f"volume-{mode}"} <= set(reply.metrics)
            assert 0 <= reply.metrics[f"overlap-{mode}"] <= reply.metrics[f"volume-{mode}"]
            assert (f"hd95-{mode}" in reply.metrics) == (reply.metrics[f"hd95-cases-{mode}"] > 0)
        if not reported:
            assert not any(k.startswith(("nsd-", "hd95", "overlap-", "volume-")) for k in reply.metrics)
    assert "1 test case(s), fewer than limits.min_eval_cases 3" in reply.meta["withheld"]


def test_ehr_statistics_below_the_floor_are_withheld(phantom_federation) -> None:
    source = phantom_federation.site_yamls[2]  # CT+PET+EHR, 3 training rows
    sent = site_work.ehr_stats_site(load_site_config(_with_limits(source, min_ehr_rows=1)))
    assert "ehr-stats" in sent.meta and "withheld" not in sent.meta
    withheld = site_work.ehr_stats_site(load_site_config(_with_limits(source, min_ehr_rows=10)))
    assert "ehr-stats" not in withheld.meta and "fewer than min_ehr_rows 10" in withheld.meta["withheld"]


def test_device_auto_is_cuda_when_a_gpu_is_seen_and_says_which(site_yaml: Path, monkeypatch, caplog) -> None:
    import logging

    site = load_site_config(site_yaml)
    assert site.device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="pemma.site"):
        assert task.resolve_device(site) == "cuda"
    assert "site-a trains on cuda (device: auto" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert task.resolve_device(site) == "cpu"
    pinned = load_site_config(_with_limits(site_yaml))  # a copy; then pin the device
    pinned = type(pinned)(**{**pinned.__dict__, "device": "cpu"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert task.resolve_device(pinned) == "cpu"
