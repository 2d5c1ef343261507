"""``pemma predict`` and ``pemma export`` on a tiny in-process run: inputs are never written over,
outputs are what their names say, errors are one line, the run's preprocessing is applied,
``--batch``, DICOM-SEG out, and a model package that predicts exactly like its run."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pemma_core.cli import main

pytestmark = pytest.mark.slow  # a whole (tiny) federation in-process, then several predictions

logging.getLogger("flwr").setLevel(logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
IBSI_DICOM_CT = Path(os.environ.get("PEMMA_IBSI_DICOM_ROOT") or REPO.parent / "shared" / "data" / "ibsi-sts-dicom") \
    / "STS_001" / "CT" / "image"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One adapt round and one prognosis round (survival head with an EHR branch: site-3 holds EHR)."""
    from client.client_app import make_client_app
    from pemma_core.config.run import RunSettings
    from pemma_core.phantoms.writer import make_federation
    from server.server_app import run_federation
    from simulation.inprocess import InProcessGrid

    root = tmp_path_factory.mktemp("predict")
    sites = list(make_federation(root / "fed", n_sites=3, cases_per_site=3, seed=0, test_cases=0).site_yamls)
    settings = RunSettings(run_dir=str(root / "run"), site_configs=",".join(map(str, sites)), rounds=1, local_steps=1,
                           batch_size=1, pretrain_rounds=0, evaluate=False, min_sites=2, prognosis_rounds=1,
                           prognosis_steps=1)
    n = len(sites)
    grid = InProcessGrid(make_client_app(), [{"partition-id": i, "num-partitions": n} for i in range(n)],
                         settings.to_run_config())
    run = run_federation(grid, settings, progress=None)
    case = root / "fed" / "site-3" / "cases" / "site-3-000"
    return {"run": run.path, "case": case, "clinical": root / "fed" / "site-3" / "clinical.csv", "site": sites[2]}


@pytest.fixture
def case(tiny_run: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of a CT+PET+label case (tests may try to write over it)."""
    target = tmp_path / "case"
    shutil.copytree(tiny_run["case"], target)
    return target


def pemma(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def error_line(err: str) -> str:
    """The command's error: exactly one line ``pemma CMD: error: ...``."""
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    index = err.splitlines().index(errors[0])
    assert index == len(err.splitlines()) - 1, f"the error is not the last, single line:\n{err}"
    return errors[0]


def load_mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


# ------------------------------------------------------------------------- inputs are never written over


def test_an_existing_mask_and_risk_file_are_kept_unless_overwrite(tiny_run, case, tmp_path, capsys) -> None:
    mask = tmp_path / "mask.nii.gz"
    base = ["predict", "--run", tiny_run["run"], "--ct", case / "ct.nii.gz", "--pet", case / "pet.nii.gz", "--out", mask]
    assert pemma(capsys, *base)[0] == 0
    risk = tmp_path / "mask.risk.json"
    assert risk.is_file()
    mask.write_bytes(b"keep me")
    risk.write_text("keep me too")
    status, _, err = pemma(capsys, *base)
    assert status == 1 and "--overwrite" in error_line(err)
    assert mask.read_bytes() == b"keep me" and risk.read_text() == "keep me too"
    mask.unlink()  # the risk file alone is protected too
    status, _, err = pemma(capsys, *base)
    assert status == 1 and "mask.risk.json" in error_line(err) and not mask.exists()
    assert pemma(capsys, *base, "--overwrite")[0] == 0
    assert load_mask(mask).shape == nib.load(str(case / "ct.nii.gz")).shape and "risk" in json.loads(risk.read_text())


def test_out_naming_the_pet_is_refused_even_with_overwrite(tiny_run, case, capsys) -> None:
    pet = case / "pet.nii.gz"
    before = pet.read_bytes()
    for extra in ([], ["--overwrite"]):
        status, _, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", case / "ct.nii.gz", "--pet", pet,
                               "--out", pet, *extra)
        assert status == 1 and "--pet" in error_line(err) and "input" in error_line(err)
        assert pet.read_bytes() == before


def test_out_naming_the_label_is_refused(tiny_run, case, capsys) -> None:
    label = case / "label.nii.gz"
    before = label.read_bytes()
    ct = case / "ct.nii.gz"
    status, _, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", ct, "--out", label)
    assert status == 1 and "exists" in error_line(err)
    status, _, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", ct, "--label", label, "--out", label,
                           "--overwrite")
    assert status == 1 and "--label" in error_line(err) and "input" in error_line(err)
    assert label.read_bytes() == before


def test_out_naming_the_clinical_csv_or_ehr_row_is_refused(tiny_run, case, tmp_path, capsys) -> None:
    clinical = tmp_path / "clinical.nii.gz"  # an odd name, but an input all the same
    shutil.copyfile(tiny_run["clinical"], clinical)
    before = clinical.read_bytes()
    status, _, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", case / "ct.nii.gz", "--out", clinical,
                           "--clinical", clinical, "--case-id", "site-3-000", "--overwrite")
    assert status == 1 and "--clinical" in error_line(err) and clinical.read_bytes() == before


# ------------------------------------------------------------------------- outputs are what their names say


def test_a_nii_out_is_uncompressed_and_a_nii_gz_out_compressed(tiny_run, case, tmp_path, capsys) -> None:
    ct = case / "ct.nii.gz"
    plain, packed = tmp_path / "mask.nii", tmp_path / "packed.nii.gz"
    assert pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", ct, "--out", plain)[0] == 0
    assert pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", ct, "--out", packed)[0] == 0
    assert plain.read_bytes()[:2] != b"\x1f\x8b" and packed.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(packed.read_bytes())[:348] == plain.read_bytes()[:348]  # the same NIfTI header
    np.testing.assert_array_equal(load_mask(plain), load_mask(packed))
    assert (tmp_path / "mask.risk.json").is_file() and (tmp_path / "packed.risk.json").is_file()


def test_an_out_that_is_a_folder_or_not_nifti_is_a_one_line_error(tiny_run, case, tmp_path, capsys) -> None:
    ct = case / "ct.nii.gz"
    status, _, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", ct, "--out", tmp_path)
    assert status == 1 and "folder" in error_line(err) and "Traceback" not in err
    status, _, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", ct, "--out", tmp_path / "mask.png")
    assert status == 1 and ".nii.gz" in error_line(err) and not (tmp_path / "mask.png").exists()


def test_a_mode_needing_pet_without_pet_is_refused(tiny_run, case, tmp_path, capsys) -> None:
    for mode in ("ctpet", "pet"):
        status, _, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", case / "ct.nii.gz", "--mode", mode,
                               "--out", tmp_path / "mask.nii.gz")
        assert status == 1 and f"--mode {mode}" in error_line(err) and "--pet" in error_line(err)
        assert not (tmp_path / "mask.nii.gz").exists()


# ------------------------------------------------------------------------- EHR


def test_a_non_numeric_ehr_value_names_its_column(tiny_run, case, tmp_path, capsys) -> None:
    row = tmp_path / "row.csv"
    row.write_text("age,sex,grade,ecog\nsixty,M,G3,1\n")
    status, _, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", case / "ct.nii.gz", "--pet",
                           case / "pet.nii.gz", "--out", tmp_path / "mask.nii.gz", "--ehr", row)
    assert status == 1 and "column 'age': 'sixty' is not a number" in error_line(err)
    assert not (tmp_path / "mask.nii.gz").exists()  # checked before anything is computed or written


def test_unseen_ehr_categories_are_warned_about_by_column_and_value(tiny_run, case, tmp_path, capsys) -> None:
    row = tmp_path / "row.csv"
    row.write_text("age,sex,grade,ecog\n60,X,G9,1\n")
    status, _, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", case / "ct.nii.gz", "--pet",
                           case / "pet.nii.gz", "--out", tmp_path / "mask.nii.gz", "--ehr", row)
    assert status == 0
    warnings = [line for line in err.splitlines() if "warning" in line and "not seen in training" in line]
    assert any("column 'sex'" in w and "'X'" in w for w in warnings), err
    assert any("column 'grade'" in w and "'G9'" in w for w in warnings), err


# ------------------------------------------------------------------------- the run's preprocessing


def copy_run(tiny_run: dict[str, Path], target: Path, preprocessing: dict | None, keep_site_yamls: bool) -> Path:
    """A copy of the run whose recorded preprocessing (run.json, metrics.json) is replaced or dropped."""
    shutil.copytree(tiny_run["run"], target)
    for name in ("run.json", "metrics.json"):
        data = json.loads((target / name).read_text())
        info = data if name == "run.json" else data["run"]
        info.pop("preprocessing", None)
        if preprocessing is not None:
            info["preprocessing"] = preprocessing
        if not keep_site_yamls:
            info.pop("site_configs", None)
        (target / name).write_text(json.dumps(data))
    return target


def images_seen(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The images the model is given (``predict_volume`` is watched)."""
    import pemma_core.training.local as local

    seen: list[torch.Tensor] = []
    original = local.predict_volume

    def watched(model, image, *args, **kwargs):
        seen.append(image.clone())
        return original(model, image, *args, **kwargs)

    monkeypatch.setattr(local, "predict_volume", watched)
    return seen


def test_the_recorded_spacing_ct_window_and_suv_ceiling_are_applied(tiny_run, case, tmp_path, capsys, monkeypatch) -> None:
    from pemma_core.data.inference_io import load_for_inference
    from pemma_core.data.pipeline import Preprocessing

    recorded = {"spacing": [5.0, 4.5, 4.0], "ct_window": [-100.0, 150.0], "pet_suv_max": 8.0, "differs": []}
    run = copy_run(tiny_run, tmp_path / "run", recorded, keep_site_yamls=True)  # the YAMLs say 3.5 mm, -200..300, 20
    seen = images_seen(monkeypatch)
    ct, pet = case / "ct.nii.gz", case / "pet.nii.gz"
    assert pemma(capsys, "predict", "--run", run, "--ct", ct, "--pet", pet, "--out", tmp_path / "m.nii.gz")[0] == 0
    expected, _ = load_for_inference(ct, pet, Preprocessing((5.0, 4.5, 4.0), (-100.0, 150.0), 8.0))
    assert len(seen) == 1 and torch.equal(seen[0], expected)


def test_an_old_run_takes_its_site_yamls_and_none_asks_for_spacing(tiny_run, case, tmp_path, capsys, monkeypatch) -> None:
    from pemma_core.config.site import load_site_config
    from pemma_core.data.inference_io import load_for_inference

    ct = case / "ct.nii.gz"
    old = copy_run(tiny_run, tmp_path / "old", None, keep_site_yamls=True)
    seen = images_seen(monkeypatch)
    assert pemma(capsys, "predict", "--run", old, "--ct", ct, "--out", tmp_path / "a.nii.gz")[0] == 0
    assert torch.equal(seen[-1], load_for_inference(ct, None, load_site_config(tiny_run["site"]))[0])

    bare = copy_run(tiny_run, tmp_path / "bare", None, keep_site_yamls=False)
    status, _, err = pemma(capsys, "predict", "--run", bare, "--ct", ct, "--out", tmp_path / "b.nii.gz")
    assert status == 1 and "--spacing" in error_line(err) and not (tmp_path / "b.nii.gz").exists()
    assert pemma(capsys, "predict", "--run", bare, "--ct", ct, "--out", tmp_path / "b.nii.gz", "--spacing", 3, 3, 3)[0] == 0
    assert seen[-1].shape != seen[0].shape  # 3 mm, not the sites' 3.5 mm


# ------------------------------------------------------------------------- --batch


def test_batch_predicts_every_good_row_and_reports_the_bad_ones(tiny_run, case, tmp_path, capsys) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copytree(case, folder / "c1")
    (folder / "taken.nii.gz").write_bytes(b"not mine")
    rows = [
        {"case_id": "one", "ct": "c1/ct.nii.gz", "pet": "c1/pet.nii.gz", "out": "out/one.nii.gz"},
        {"case_id": "two", "ct": str(case / "ct.nii.gz"), "pet": "", "out": "out/two.nii"},
        {"case_id": "ghost", "ct": "nowhere/ct.nii.gz", "pet": "", "out": "out/ghost.nii.gz"},
        {"case_id": "clash", "ct": "c1/ct.nii.gz", "pet": "", "out": "c1/pet.nii.gz"},  # an input of another row
        {"case_id": "taken", "ct": "c1/ct.nii.gz", "pet": "", "out": "taken.nii.gz"},
    ]
    table = folder / "cases.csv"
    with table.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["case_id", "ct", "pet", "out"])
        writer.writeheader()
        writer.writerows(rows)
    pet_before = (folder / "c1" / "pet.nii.gz").read_bytes()
    status, out, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--batch", table)
    assert status == 1
    assert load_mask(folder / "out" / "one.nii.gz").shape == nib.load(str(case / "ct.nii.gz")).shape
    assert (folder / "out" / "two.nii").read_bytes()[:2] != b"\x1f\x8b"
    assert not (folder / "out" / "ghost.nii.gz").exists()
    assert (folder / "c1" / "pet.nii.gz").read_bytes() == pet_before
    assert (folder / "taken.nii.gz").read_bytes() == b"not mine"
    failed = [line for line in err.splitlines() if line.startswith("pemma predict: case ")]
    assert [line.split()[3].strip(":") for line in failed] == ["ghost", "clash", "taken"], err
    assert "2 of 5 cases predicted, 3 failed" in out
    # Single-case options make no sense with a table: a usage error.
    assert pemma(capsys, "predict", "--run", tiny_run["run"], "--batch", table, "--ct", case / "ct.nii.gz")[0] == 2


# ------------------------------------------------------------------------- DICOM-SEG


def dicom_series(folder: Path) -> list:
    import pydicom

    slices = [pydicom.dcmread(str(p)) for p in sorted(folder.glob("*.dcm"))]
    return sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))


def nifti_from_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """HU [X, Y, Z] and its RAS affine, computed here from the slices' geometry (independent of pemma)."""
    slices = dicom_series(folder)
    first = slices[0]
    row_dir, col_dir = np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:], float)
    spacing_r, spacing_c = (float(v) for v in first.PixelSpacing)
    ends = np.array(slices[-1].ImagePositionPatient, float), np.array(first.ImagePositionPatient, float)
    step = (ends[0] - ends[1]) / (len(slices) - 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row_dir * spacing_c, col_dir * spacing_r, step  # voxel (column, row, slice)
    lps[:3, 3] = np.array(first.ImagePositionPatient, float)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    hu = np.stack([d.pixel_array.T * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices], axis=-1)
    return hu.astype(np.float32), affine


def world_points_of_nifti(mask: np.ndarray, affine: np.ndarray) -> set[tuple[float, ...]]:
    index = np.argwhere(mask > 0)
    world = (affine @ np.c_[index, np.ones(len(index))].T).T[:, :3] * [-1, -1, 1]  # RAS -> LPS
    return {tuple(p) for p in np.round(world, 2)}


def world_points_of_seg(seg) -> set[tuple[float, ...]]:
    """Every voxel of segment 1, in LPS mm, from each frame's own plane position in the SEG file."""
    points = set()
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        segment = group if "SegmentIdentificationSequence" in group else shared  # one segment: may be shared
        assert int(segment.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == 1
        origin = np.array(group.PlanePositionSequence[0].ImagePositionPatient, float)
        rows, cols = np.nonzero(frame)
        world = origin + np.outer(cols * spacing[1], orientation[:3]) + np.outer(rows * spacing[0], orientation[3:])
        points |= {tuple(p) for p in np.round(world, 2)}
    return points


def test_dicom_seg_round_trip_matches_the_nifti_mask(tmp_path: Path) -> None:
    import highdicom as hd
    import pydicom

    from pemma_core.data.inference_io import write_dicom_seg

    hu, affine = nifti_from_dicom_series(IBSI_DICOM_CT)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[20:60, 30:45, 10:14] = 1  # asymmetric on every axis: a flip or a transposition would show
    mask[100:103, 150:190, 40] = 1
    mask_file = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, affine), str(mask_file))
    out = write_dicom_seg(mask_file, IBSI_DICOM_CT, tmp_path / "mask.seg.dcm")
    seg = hd.seg.segread(str(out))
    source = dicom_series(IBSI_DICOM_CT)
    assert seg.Modality == "SEG" and seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    referenced = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in source}
    assert world_points_of_seg(pydicom.dcmread(str(out))) == world_points_of_nifti(mask, affine)
    with pytest.raises(FileExistsError):
        write_dicom_seg(mask_file, IBSI_DICOM_CT, out)


def test_seg_needs_a_dicom_ct(tiny_run, case, tmp_path, capsys) -> None:
    status, _, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", case / "ct.nii.gz",
                           "--out", tmp_path / "mask.nii.gz", "--seg", tmp_path / "mask.dcm")
    assert status == 1 and "DICOM series" in error_line(err) and not (tmp_path / "mask.nii.gz").exists()


def test_predict_on_a_dicom_ct_series_writes_a_matching_seg(tiny_run, tmp_path, capsys) -> None:
    import pydicom

    mask, seg = tmp_path / "mask.nii.gz", tmp_path / "mask.dcm"
    status, _, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", IBSI_DICOM_CT, "--out", mask,
                           "--seg", seg)
    assert status == 0, err
    written = nib.load(str(mask))
    source = dicom_series(IBSI_DICOM_CT)
    assert written.shape == (source[0].Columns, source[0].Rows, len(source))  # the series' own grid [column, row, slice]
    assert world_points_of_seg(pydicom.dcmread(str(seg))) == world_points_of_nifti(load_mask(mask), written.affine)


# ------------------------------------------------------------------------- export


def test_export_makes_a_package_that_predicts_exactly_like_its_run(tiny_run, case, tmp_path, capsys, monkeypatch) -> None:
    from pemma_core.model.files import read_adapter_file

    run = copy_run(tiny_run, tmp_path / "run", json.loads((tiny_run["run"] / "run.json").read_text())["preprocessing"],
                   keep_site_yamls=True)
    package = tmp_path / "package"
    status, out, err = pemma(capsys, "export", run, package)
    assert status == 0, err
    metadata = json.loads((package / "configs" / "metadata.json").read_text())
    adapters = read_adapter_file(package / "models" / "adapters.safetensors")[1]
    assert (package / "models" / "backbone.safetensors").is_file()
    assert metadata["pemma"]["round"] == 2 and metadata["pemma"]["fingerprint"] == adapters["fingerprint"]
    assert metadata["pemma"]["preprocessing"] == {"spacing": [3.5, 3.5, 3.5], "ct_window": [-200.0, 300.0],
                                                  "pet_suv_max": 20.0, "orientation": "RAS"}
    assert set(metadata["pemma"]["modes"]) == {"ct", "pet", "ctpet"} and metadata["pemma"]["model_spec"]["survival"]
    card = (package / "README.md").read_text()
    assert all(word in card for word in ("site-1", "site-2", "site-3", "Apache-2.0", "research only", "C-index"))
    assert pemma(capsys, "export", run, package)[0] == 1  # never over an existing package
    assert pemma(capsys, "export", run, tmp_path / "round1", "--round", 1)[0] == 0
    assert json.loads((tmp_path / "round1" / "configs" / "metadata.json").read_text())["pemma"]["round"] == 1

    ct, pet = case / "ct.nii.gz", case / "pet.nii.gz"
    assert pemma(capsys, "predict", "--run", run, "--ct", ct, "--pet", pet, "--out", tmp_path / "from-run.nii.gz")[0] == 0
    moved = tmp_path / "elsewhere"
    shutil.move(str(package), moved)
    shutil.rmtree(run)  # no run folder, and no site YAML may be read
    import pemma_core.config.site as site_module

    def no_yaml(*_args, **_kwargs):
        raise AssertionError("the package must not need a site YAML")

    monkeypatch.setattr(site_module, "load_site_config", no_yaml)
    status, out, err = pemma(capsys, "predict", "--model", moved, "--ct", ct, "--pet", pet,
                             "--out", tmp_path / "from-package.nii.gz")
    assert status == 0, err
    np.testing.assert_array_equal(load_mask(tmp_path / "from-package.nii.gz"), load_mask(tmp_path / "from-run.nii.gz"))
    assert json.loads((tmp_path / "from-package.risk.json").read_text())["risk"] == pytest.approx(
        json.loads((tmp_path / "from-run.risk.json").read_text())["risk"], abs=0)
    adapters_file = moved / "models" / "adapters.safetensors"
    adapters_file.write_bytes(adapters_file.read_bytes()[:-1] + b"\0")  # one byte altered
    status, _, err = pemma(capsys, "predict", "--model", moved, "--ct", ct, "--out", tmp_path / "altered.nii.gz")
    assert status == 1 and "SHA-256" in error_line(err) and not (tmp_path / "altered.nii.gz").exists()


def test_the_model_card_reports_the_final_dice_per_mode_and_c_index_of_the_exported_round() -> None:
    from simulation.model_package import final_metrics

    metrics = {"rounds": [
        {"phase": "adapt", "round": 1, "eval_metrics": {"dice-ct": 0.5, "dice-ctpet": 0.6}},
        {"phase": "adapt", "round": 2, "eval_metrics": {"dice-ct": 0.55, "dice-pet": 0.4, "dice-ctpet": 0.7}},
        {"phase": "adapt", "round": 3, "eval_metrics": {}},  # not evaluated: round 2's Dice is the last measured
        {"phase": "prognosis", "round": 4, "train_metrics": {"loss": 1.0, "c-index": 0.61}},
        {"phase": "prognosis", "round": 5, "train_metrics": {"loss": 0.9, "c-index": 0.66}},
    ]}
    assert final_metrics(metrics, 5) == {"dice": {"ct": 0.55, "pet": 0.4, "ctpet": 0.7}, "dice_round": 2,
                                         "c_index": 0.66, "c_index_round": 5}
    assert final_metrics(metrics, 4)["c_index"] == 0.61
    assert final_metrics(metrics, 1) == {"dice": {"ct": 0.5, "ctpet": 0.6}, "dice_round": 1, "c_index": None,
                                         "c_index_round": None}


def test_label_gives_the_dice_of_the_mask(tiny_run, case, tmp_path, capsys) -> None:
    mask, label = tmp_path / "mask.nii.gz", case / "label.nii.gz"
    status, out, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", case / "ct.nii.gz", "--pet",
                             case / "pet.nii.gz", "--label", label, "--out", mask)
    assert status == 0, err
    pred, truth = load_mask(mask) > 0, load_mask(label) > 0  # the phantom's label is on its CT grid
    expected = 2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())
    printed = next(line for line in out.splitlines() if line.startswith("Dice "))
    assert float(printed.split()[1]) == pytest.approx(expected, abs=1e-4) and str(label) in printed


def test_predict_on_a_dicom_case_equals_predict_on_its_nifti(tiny_run, tmp_path, capsys) -> None:
    """The same patient as DICOM series and as NIfTI: the same model input, and the same mask on the
    same grid (Dice >= 0.99; the tiny run's mask alone would be a weak witness, so the input is compared too)."""
    from pemma_core.data.inference_io import load_for_inference

    dicom_case = IBSI_DICOM_CT.parents[1]
    nifti_case = IBSI_DICOM_CT.parents[2].parent / "ibsi-sts" / dicom_case.name
    spacing = (2.0, 2.0, 3.27)
    dicom_image, _ = load_for_inference(dicom_case / "CT" / "image", dicom_case / "PET" / "image", spacing)
    nifti_image, _ = load_for_inference(nifti_case / "CT_image.nii.gz", nifti_case / "PET_image.nii.gz", spacing)
    assert dicom_image.shape == nifti_image.shape and float(nifti_image[:, 1].max()) > 0
    assert float((dicom_image - nifti_image).abs().max()) <= 1e-4  # normalised CT and PET channels
    masks = {}
    for kind, ct, pet in (("dicom", dicom_case / "CT" / "image", dicom_case / "PET" / "image"),
                          ("nifti", nifti_case / "CT_image.nii.gz", nifti_case / "PET_image.nii.gz")):
        out = tmp_path / f"{kind}.nii.gz"
        status, _, err = pemma(capsys, "predict", "--run", tiny_run["run"], "--ct", ct, "--pet", pet, "--out", out)
        assert status == 0, err
        masks[kind] = nib.load(str(out))
    np.testing.assert_allclose(masks["dicom"].affine, masks["nifti"].affine, atol=1e-3)
    a, b = (np.asarray(m.dataobj) > 0 for m in masks.values())
    assert a.shape == b.shape and a.any()
    dice = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    print(f"DICOM vs NIfTI predict, {dicom_case.name}: Dice {dice:.5f}, {a.sum()} vs {b.sum()} voxels")
    assert dice >= 0.99
