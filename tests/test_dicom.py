"""DICOM in: the 4 IBSI DICOM cases against their NIfTI twins, BQML -> SUV, RTSTRUCT and DICOM-SEG labels,
`pemma convert`, check-site on broken copies, the gzip check of every NIfTI, the conversion cache and a
federation with a DICOM site."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pemma_core.cli import main
from pemma_core.config.site import load_site_config
from pemma_core.data.dicom import DicomError
from pemma_core.data.manifest import Case
from pemma_core.data.site_check import check_site
from pemma_core.data.volumes import (
    CorruptFileError,
    Volume,
    materialise_case,
    read_volume,
    verify_gzip,
    write_nifti,
)

REPO = Path(__file__).resolve().parents[1]
CASES = ("STS_001", "STS_002", "STS_012", "STS_019")
SITE_YAML = REPO / "sites" / "ibsi-dicom" / "site.yaml"


@pytest.fixture(scope="session")
def dicom_root() -> Path:
    """The IBSI DICOM cases: $PEMMA_IBSI_DICOM_ROOT, else ../shared/data/ibsi-sts-dicom beside the repository."""
    root = Path(os.environ.get("PEMMA_IBSI_DICOM_ROOT") or REPO.parent / "shared" / "data" / "ibsi-sts-dicom")
    assert (root / "STS_001" / "CT" / "image").is_dir(), f"no IBSI DICOM at {root} (set PEMMA_IBSI_DICOM_ROOT)"
    return root


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def edit_series(folder: Path, edit) -> None:
    """Apply ``edit(dataset, path)`` to every file of a (copied) series and save it in place."""
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        edit(ds, path)
        ds.save_as(path)


# ------------------------------------------------------------------------- the real cases


@pytest.mark.parametrize("case", CASES)
def test_series_and_rtstruct_equal_their_nifti_twins(
    case: str, dicom_root: Path, ibsi_root: Path, record_property: pytest.RecordProperty
) -> None:
    numbers = {}
    for kind, folder, twin in (("ct", "CT", "CT_image"), ("pet", "PET", "PET_image")):
        volume = read_volume(dicom_root / case / folder / "image", kind=kind)
        nifti = nib.load(ibsi_root / case / f"{twin}.nii.gz")
        assert volume.array.shape == nifti.shape
        numbers[f"{kind}_max_abs_diff"] = float(np.abs(volume.array - nifti.get_fdata()).max())
        numbers[f"{kind}_affine_diff_mm"] = float(np.abs(volume.affine - nifti.affine).max())
    assert "GML" in " ".join(volume.notes)  # the PET's units, recorded
    label = read_volume(dicom_root / case / "CT" / "mask" / "RS.dcm", kind="label",
                        reference=dicom_root / case / "CT" / "image", roi="GTV_Mass_CT")
    twin = nib.load(ibsi_root / case / "CT_mask.nii.gz")
    assert label.array.shape == twin.shape and np.abs(label.affine - twin.affine).max() <= 1e-3
    numbers["rtstruct_dice"] = dice(label.array, np.asarray(twin.dataobj))
    for key, value in numbers.items():
        record_property(key, value)
    print(f"{case}: {json.dumps(numbers)}")
    assert numbers["ct_max_abs_diff"] <= 1e-3 and numbers["pet_max_abs_diff"] <= 1e-3
    assert numbers["ct_affine_diff_mm"] <= 1e-3 and numbers["pet_affine_diff_mm"] <= 1e-3
    assert numbers["rtstruct_dice"] >= 0.95


def test_sts_019_keeps_its_pet_header_offset(dicom_root: Path, ibsi_root: Path) -> None:
    """The PET z-origin 6.58 mm below the CT's (ibsi-sts README) comes from the DICOM itself: read, not "fixed"."""
    ct = read_volume(dicom_root / "STS_019" / "CT" / "image", kind="ct")
    pet = read_volume(dicom_root / "STS_019" / "PET" / "image", kind="pet")
    assert pet.affine[2, 3] - ct.affine[2, 3] == pytest.approx(-6.58, abs=0.01)
    twin = nib.load(ibsi_root / "STS_019" / "PET_image.nii.gz")
    assert pet.affine[2, 3] == pytest.approx(twin.affine[2, 3], abs=1e-3)


def _pet_copy(dicom_root: Path, tmp_path: Path, case: str = "STS_002") -> Path:
    target = tmp_path / case / "PET"
    shutil.copytree(dicom_root / case / "PET" / "image", target)
    return target


@pytest.mark.parametrize("correction", ["ADMIN", "START"])
def test_bqml_pet_is_converted_to_suv(correction: str, dicom_root: Path, ibsi_root: Path, tmp_path: Path) -> None:
    """A copy of a GML (SUV) series re-expressed in Bq/mL reads back as the same SUVs."""
    folder = _pet_copy(dicom_root, tmp_path)

    def to_bqml(ds: pydicom.Dataset, _: Path) -> None:
        info = ds.RadiopharmaceuticalInformationSequence[0]
        dose = float(info.RadionuclideTotalDose)
        if correction == "START":  # the dose decayed from the injection to the series start
            def seconds(text: str) -> float:
                return int(text[:2]) * 3600 + int(text[2:4]) * 60 + float(text[4:])
            elapsed = seconds(str(ds.SeriesTime)) - seconds(str(info.RadiopharmaceuticalStartTime))
            dose *= 2 ** (-elapsed / float(info.RadionuclideHalfLife))
        ds.Units, ds.DecayCorrection = "BQML", correction
        ds.RescaleSlope = f"{float(ds.RescaleSlope) * dose / (float(ds.PatientWeight) * 1000):.10g}"

    edit_series(folder, to_bqml)
    volume = read_volume(folder, kind="pet")
    twin = nib.load(ibsi_root / "STS_002" / "PET_image.nii.gz")
    assert np.abs(volume.array - twin.get_fdata()).max() <= 1e-3
    assert any("BQML converted to SUV" in n and correction in n for n in volume.notes)


# ------------------------------------------------------------------------- labels


def test_rtstruct_roi_by_pattern_and_unknown_roi_lists_the_rois(dicom_root: Path) -> None:
    rtstruct, reference = dicom_root / "STS_002" / "CT" / "mask" / "RS.dcm", dicom_root / "STS_002" / "CT" / "image"
    by_glob = read_volume(rtstruct, kind="label", reference=reference, roi="gtv_*")
    by_regex = read_volume(rtstruct, kind="label", reference=reference, roi=r"GTV_\w+_CT")
    only = read_volume(rtstruct, kind="label", reference=reference)  # the file's only ROI
    assert np.array_equal(by_glob.array, by_regex.array) and np.array_equal(by_glob.array, only.array)
    assert by_glob.array.sum() > 0
    with pytest.raises(DicomError) as caught:
        read_volume(rtstruct, kind="label", reference=reference, roi="Liver")
    assert str(rtstruct) in str(caught.value) and "ROIName (3006,0026)" in str(caught.value)
    assert "'GTV_Mass_CT'" in str(caught.value)  # the ROIs present
    with pytest.raises(ValueError, match="needs the image it is drawn on"):
        read_volume(rtstruct, kind="label")


def test_rtstruct_of_another_series_is_refused(dicom_root: Path) -> None:
    pet_contours = dicom_root / "STS_002" / "PET" / "mask" / "RS.dcm"  # drawn on the PET
    with pytest.raises(DicomError) as caught:
        read_volume(pet_contours, kind="label", reference=dicom_root / "STS_002" / "CT" / "image")
    assert "SeriesInstanceUID (0020,000E)" in str(caught.value) and "references series" in str(caught.value)


def test_dicom_seg_label(dicom_root: Path, ibsi_root: Path, tmp_path: Path) -> None:
    """A DICOM-SEG written by highdicom from CT_mask reads back voxel for voxel (and nearest neighbour on the PET)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    series = dicom_root / "STS_002" / "CT" / "image"
    images = [pydicom.dcmread(p) for p in sorted(series.glob("*.dcm"))]
    mask = np.asarray(nib.load(ibsi_root / "STS_002" / "CT_mask.nii.gz").dataobj) > 0
    rank = np.argsort(np.argsort([float(ds.ImagePositionPatient[2]) for ds in images]))  # file -> z index
    frames = np.stack([mask[:, :, rank[i]].T for i in range(len(images))]).astype(np.uint8)  # [x, y] -> [row, col]
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Tumour", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="pemma tests", manufacturer_model_name="test", software_versions="0",
        device_serial_number="0")
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    label = read_volume(path, kind="label", reference=series, roi="tumour")
    assert np.array_equal(label.array > 0, mask)
    on_pet = read_volume(path, kind="label", reference=dicom_root / "STS_002" / "PET" / "image")
    pet_mask = np.asarray(nib.load(ibsi_root / "STS_002" / "PET_mask.nii.gz").dataobj)
    assert dice(on_pet.array, pet_mask) >= 0.9 and any("nearest neighbour" in n for n in on_pet.notes)
    with pytest.raises(DicomError, match=r"SegmentLabel \(0062,0005\).*'Tumour'"):
        read_volume(path, kind="label", reference=series, roi="Liver")


# ------------------------------------------------------------------------- broken series


def _copy_series(dicom_root: Path, tmp_path: Path, name: str, modality: str = "CT", case: str = "STS_002") -> Path:
    target = tmp_path / "data" / name
    shutil.copytree(dicom_root / case / modality / "image", target)
    return target


def test_a_folder_with_several_series_names_them_and_a_named_one_is_read(dicom_root: Path, tmp_path: Path) -> None:
    folder = _copy_series(dicom_root, tmp_path, "two-series")
    last = sorted(folder.glob("*.dcm"))[-1]  # an end slice: the rest stays a complete volume
    ds = pydicom.dcmread(last)
    main_uid, ds.SeriesInstanceUID = ds.SeriesInstanceUID, generate_uid()
    ds.save_as(last)
    with pytest.raises(DicomError) as caught:
        read_volume(folder, kind="ct")
    text = str(caught.value)
    assert str(folder) in text and "SeriesInstanceUID (0020,000E)" in text
    assert main_uid in text and ds.SeriesInstanceUID in text and "2 series" in text
    volume = read_volume(folder, kind="ct", series_uids=[main_uid])
    assert volume.array.shape[2] == len(list(folder.glob("*.dcm"))) - 1


@pytest.fixture
def broken_site(dicom_root: Path, ibsi_root: Path, tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A site YAML whose cases are each broken one way (copies in tmp_path), plus one intact case."""
    case = dicom_root / "STS_002"
    broken: dict[str, Path] = {}

    folder = broken["missing-slice"] = _copy_series(dicom_root, tmp_path, "missing-slice")
    sorted(folder.glob("*.dcm"))[20].unlink()

    folder = broken["duplicated-slice"] = _copy_series(dicom_root, tmp_path, "duplicated-slice")
    shutil.copy(sorted(folder.glob("*.dcm"))[10], folder / "copy-of-10.dcm")

    folder = broken["two-series"] = _copy_series(dicom_root, tmp_path, "two-series")
    path = sorted(folder.glob("*.dcm"))[5]
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(path)

    folder = broken["bqml-no-weight"] = _copy_series(dicom_root, tmp_path, "bqml-no-weight", "PET")

    def strip_weight(ds: pydicom.Dataset, _: Path) -> None:
        ds.Units = "BQML"
        del ds.PatientWeight

    edit_series(folder, strip_weight)

    folder = broken["other-frame"] = _copy_series(dicom_root, tmp_path, "other-frame", "PET")
    frame = generate_uid()
    edit_series(folder, lambda ds, _: setattr(ds, "FrameOfReferenceUID", frame))

    corrupt = broken["corrupt-gzip"] = tmp_path / "data" / "corrupt" / "CT_image.nii.gz"
    corrupt.parent.mkdir(parents=True)
    data = bytearray((ibsi_root / "STS_002" / "CT_image.nii.gz").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    corrupt.write_bytes(bytes(data))

    ct, pet, label = case / "CT" / "image", case / "PET" / "image", case / "CT" / "mask" / "RS.dcm"
    rows = [
        ("intact", ct, pet, label),
        ("missing-slice", broken["missing-slice"], pet, label),
        ("duplicated-slice", broken["duplicated-slice"], pet, label),
        ("two-series", broken["two-series"], pet, label),
        ("bqml-no-weight", ct, broken["bqml-no-weight"], label),
        ("other-frame", ct, broken["other-frame"], label),
        ("roi-not-found", ct, pet, case / "PET" / "mask" / "RS.dcm"),  # ROI GTV_Mass_PET, on the PET
        ("other-series", ct, pet, dicom_root / "STS_001" / "CT" / "mask" / "RS.dcm"),
        ("corrupt-gzip", corrupt, ibsi_root / "STS_002" / "PET_image.nii.gz", ibsi_root / "STS_002" / "CT_mask.nii.gz"),
    ]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("case_id,ct,pet,label,split\n" + "".join(f"{r[0]},{r[1]},{r[2]},{r[3]},train\n" for r in rows))
    site = tmp_path / "site.yaml"
    site.write_text(f"name: broken\ndata_root: {tmp_path / 'data'}\nmodalities: [ct, pet]\nmanifest: {manifest}\n"
                    f"label_roi: GTV_Mass_CT\ncache_dir: {tmp_path / 'cache'}\n")
    return site, broken


def test_check_site_names_the_folder_and_the_tag_of_each_dicom_problem(broken_site, dicom_root: Path) -> None:
    site, broken = broken_site
    report = check_site(load_site_config(site))
    entries = {e["case_id"]: e for e in report["cases"]}
    problems = {case: " | ".join(e["problems"]) for case, e in entries.items()}
    assert entries["intact"]["status"] == "ok", problems["intact"]
    expected = {  # case -> (where, tags that must be named)
        "missing-slice": (broken["missing-slice"], ["InstanceNumber (0020,0013)", "ImagePositionPatient (0020,0032)"]),
        "duplicated-slice": (broken["duplicated-slice"], ["SOPInstanceUID (0008,0018)", "InstanceNumber (0020,0013)",
                                                          "ImagePositionPatient (0020,0032)"]),
        "two-series": (broken["two-series"], ["SeriesInstanceUID (0020,000E)"]),
        "bqml-no-weight": (broken["bqml-no-weight"], ["PatientWeight (0010,1030)"]),
        "other-frame": (broken["other-frame"], ["FrameOfReferenceUID (0020,0052)"]),
        "roi-not-found": (dicom_root / "STS_002" / "PET" / "mask" / "RS.dcm", ["ROIName (3006,0026)"]),
        "other-series": (dicom_root / "STS_001" / "CT" / "mask" / "RS.dcm", ["SeriesInstanceUID (0020,000E)"]),
    }
    for case, (where, tags) in expected.items():
        assert entries[case]["status"] == "bad", case
        assert str(where) in problems[case], (case, problems[case])
        for tag in tags:
            assert tag in problems[case], (case, tag, problems[case])
    assert "missing between" in problems["missing-slice"] and "uneven slice spacing" in problems["missing-slice"]
    assert "2 series in one folder" in problems["two-series"]
    assert "'GTV_Mass_PET'" in problems["roi-not-found"]  # the ROIs present are listed
    assert str(broken["corrupt-gzip"]) in problems["corrupt-gzip"] and "CRC" in problems["corrupt-gzip"]
    assert report["ready"] and report["summary"]["usable"] == {"train": 1}
    assert not (site.parent / "cache").exists()  # check-site writes nothing


# ------------------------------------------------------------------------- gzip integrity


def test_a_gzip_corrupted_nifti_is_refused(broken_site) -> None:
    _, broken = broken_site
    corrupt = broken["corrupt-gzip"]
    # (nibabel 5.4 alone loads this file without a word: it stops before the CRC. Hence the whole stream is read.)
    with pytest.raises(CorruptFileError, match="CRC check failed") as caught:
        read_volume(corrupt, kind="ct")
    assert str(corrupt) in str(caught.value)
    truncated = corrupt.with_name("truncated.nii.gz")
    truncated.write_bytes(corrupt.read_bytes()[: len(corrupt.read_bytes()) // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        verify_gzip(truncated)


def test_pemma_check_site_refuses_a_gzip_corrupted_nifti(broken_site, tmp_path: Path) -> None:
    site, broken = broken_site
    manifest = tmp_path / "only-corrupt.csv"
    rows = [line for line in (tmp_path / "manifest.csv").read_text().splitlines()
            if line.startswith(("case_id", "corrupt"))]
    manifest.write_text("\n".join(rows) + "\n")
    only = tmp_path / "only-corrupt.yaml"
    only.write_text(site.read_text().replace(str(tmp_path / "manifest.csv"), str(manifest)))
    done = subprocess.run([sys.executable, "-m", "pemma_core.cli", "check-site", "-q", str(only)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{broken['corrupt-gzip']}: unreadable CT (damaged or truncated gzip stream" in done.stdout
    assert "NOT READY" in done.stdout


# ------------------------------------------------------------------------- the site, the cache


def test_check_site_passes_on_the_ibsi_dicom_site() -> None:
    done = subprocess.run([sys.executable, "-m", "pemma_core.cli", "check-site", "-q", str(SITE_YAML)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 ok, 0 bad" in done.stdout and "READY: 4 usable train case(s)" in done.stdout


def test_site_yaml_label_roi_and_dicom_series(tmp_path: Path) -> None:
    cfg = load_site_config(SITE_YAML)
    assert cfg.label_roi == "GTV_Mass_CT" and cfg.dicom_series == ()
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndata_root: d\nmodalities: [ct]\nmanifest: m.csv\n"
                    "dicom_series: 1.2.3\nlabel_roi: 'GTV*'\n")
    cfg = load_site_config(path)
    assert cfg.dicom_series == ("1.2.3",) and cfg.label_roi == "GTV*"


def test_cases_are_converted_once_and_again_when_a_series_changes(
    dicom_root: Path, ibsi_root: Path, tmp_path: Path
) -> None:
    ct = _copy_series(dicom_root, tmp_path, "ct")
    source = dicom_root / "STS_002"
    case = Case("STS_002", ct, source / "PET" / "image", source / "CT" / "mask" / "RS.dcm", "train")
    cache = tmp_path / "cache"
    first = materialise_case(case, cache, label_roi="GTV*")
    assert first.ct == cache / "converted" / "STS_002" / "ct.nii.gz" and first.label.name == "label.nii.gz"
    twin = nib.load(ibsi_root / "STS_002" / "CT_image.nii.gz")
    assert np.abs(nib.load(first.ct).get_fdata() - twin.get_fdata()).max() <= 1e-3
    assert np.abs(nib.load(first.ct).affine - twin.affine).max() <= 1e-3
    assert dice(nib.load(first.label).dataobj, nib.load(ibsi_root / "STS_002" / "CT_mask.nii.gz").dataobj) >= 0.95
    stamps = {role: getattr(first, role).stat().st_mtime_ns for role in ("ct", "pet", "label")}
    again = materialise_case(case, cache, label_roi="GTV*")
    assert {role: getattr(again, role).stat().st_mtime_ns for role in stamps} == stamps  # nothing converted twice
    cached = read_volume(ct, kind="ct", cache_dir=cache, case_id="STS_002")
    assert "DICOM" in cached.source and cached.dicom["Modality"] == "CT"

    edit_series(ct, lambda ds, _: setattr(ds, "RescaleIntercept", "-10"))  # the hospital re-exported the series
    changed = materialise_case(case, cache, label_roi="GTV*")
    assert changed.ct.stat().st_mtime_ns != stamps["ct"] and changed.label.stat().st_mtime_ns != stamps["label"]
    assert changed.pet.stat().st_mtime_ns == stamps["pet"]
    assert np.abs(nib.load(changed.ct).get_fdata() - (twin.get_fdata() - 10)).max() <= 1e-3
    assert materialise_case(dataclasses.replace(case, ct=ibsi_root / "STS_002" / "CT_image.nii.gz"), cache).ct == \
        ibsi_root / "STS_002" / "CT_image.nii.gz"  # NIfTI stays as it is


@pytest.mark.slow  # converts 4 cases and loads MONAI
def test_site_cases_hand_the_loaders_nifti(tmp_path: Path) -> None:
    from pemma_core.data.cases import site_cases
    from pemma_core.data.pipeline import cached_dataset

    cfg = dataclasses.replace(load_site_config(SITE_YAML), cache_dir=tmp_path / "cache")
    cases, problems = site_cases(cfg)
    assert problems == [] and [c.case_id for c in cases] == list(CASES)
    for case in cases:
        for role in ("ct", "pet", "label"):
            assert getattr(case, role).parent == tmp_path / "cache" / "converted" / case.case_id
    item = cached_dataset(cfg, cases[1:2], with_label=True)[0]
    assert tuple(item["image"].shape[:1]) == (2,) and float(item["label"].sum()) > 0


# ------------------------------------------------------------------------- pemma convert


def test_pemma_convert_series_and_rtstruct_and_refuses_to_overwrite(
    dicom_root: Path, ibsi_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = dicom_root / "STS_012"
    ct_out, pet_out, label_out = tmp_path / "ct.nii.gz", tmp_path / "out" / "pet.nii.gz", tmp_path / "label.nii.gz"
    assert main(["convert", str(case / "CT" / "image"), str(ct_out)]) == 0  # kind from the Modality
    assert main(["convert", str(case / "PET" / "image"), str(pet_out), "--kind", "pet"]) == 0
    assert main(["convert", str(case / "CT" / "mask" / "RS.dcm"), str(label_out),
                 "--reference", str(case / "CT" / "image"), "--roi", "GTV_Mass_CT"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {ct_out}: CT 159 x 155 x 53" in out and "SUV" in out and "voxels inside" in out
    for written, twin in ((ct_out, "CT_image"), (pet_out, "PET_image"), (label_out, "CT_mask")):
        nifti, expected = nib.load(written), nib.load(ibsi_root / "STS_012" / f"{twin}.nii.gz")
        assert np.abs(nifti.get_fdata() - expected.get_fdata()).max() <= 1e-3, written
        assert np.abs(nifti.affine - expected.affine).max() <= 1e-3, written
    assert np.asarray(nib.load(label_out).dataobj).dtype == np.uint8

    before = ct_out.stat().st_mtime_ns
    assert main(["convert", str(case / "CT" / "image"), str(ct_out)]) == 1
    assert "already exists; refusing to overwrite it (give --overwrite)" in capsys.readouterr().err
    assert ct_out.stat().st_mtime_ns == before
    assert main(["convert", str(case / "CT" / "image"), str(ct_out), "--overwrite"]) == 0
    assert ct_out.stat().st_mtime_ns != before

    assert main(["convert", str(case / "CT" / "mask" / "RS.dcm"), str(tmp_path / "x.nii.gz")]) == 2  # no --reference
    assert "needs --reference" in capsys.readouterr().err
    assert main(["convert", str(case / "CT" / "image"), str(tmp_path / "x.mha")]) == 2
    assert main(["convert", str(case), str(tmp_path / "x.nii.gz")]) == 1  # the case folder holds no image itself
    assert "not a DICOM series folder" in capsys.readouterr().err
    assert main(["convert", str(case / "CT" / "image"), str(tmp_path / "x.nii.gz"), "--kind", "pet"]) == 1
    assert "Modality (0008,0060): CT, expected PT" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_write_nifti_round_trip(tmp_path: Path) -> None:
    affine = np.array([[-2.0, 0, 0, 10], [0, -2.0, 0, 20], [0, 0, 3.0, -30], [0, 0, 0, 1]])
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    path = write_nifti(Volume(array, affine, "test"), tmp_path / "a.nii.gz")
    back = read_volume(path, kind="ct")
    assert np.array_equal(back.array, array) and np.allclose(back.affine, affine)
    assert int(nib.load(path).header["sform_code"]) == 1 and int(nib.load(path).header["qform_code"]) == 1
    with pytest.raises(ValueError, match="cannot work out the file type"):
        read_volume(tmp_path, kind="ct")  # an empty folder is no series


# ------------------------------------------------------------------------- federation


@pytest.mark.slow
def test_a_dicom_site_trains_beside_two_nifti_sites(dicom_root: Path, ibsi_root: Path, tmp_path: Path) -> None:
    import torch

    from client.client_app import make_client_app
    from pemma_core.config.run import RunSettings
    from pemma_core.model.files import save_backbone
    from pemma_core.model.spec import build_backbone
    from server.server_app import run_federation
    from simulation.inprocess import InProcessGrid

    logging.getLogger("flwr").setLevel(logging.WARNING)
    yamls = []
    for name, cases, modalities in (("ibsi-site-a", ["STS_014", "STS_025", "STS_028"], "[ct]"),
                                    ("ibsi-site-b", ["STS_004", "STS_024", "STS_031"], "[ct, pet]")):
        manifest = tmp_path / f"{name}.csv"  # 3 cases of each NIfTI site (sites/ibsi), for time
        pet = "{c}/PET_image.nii.gz" if "pet" in modalities else ""
        manifest.write_text("case_id,ct,pet,label,split\n" + "".join(
            f"{c},{c}/CT_image.nii.gz,{pet.format(c=c)},{c}/CT_mask.nii.gz,train\n" for c in cases))
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\ndata_root: {ibsi_root}\nmodalities: {modalities}\nmanifest: {manifest}\n"
                        f"spacing: [2.0, 2.0, 3.27]\ncache_dir: {tmp_path / 'cache' / name}\nlimits:\n"
                        "  min_examples_per_round: 2\n")
        yamls.append(path)
    dicom_site = tmp_path / "ibsi-dicom.yaml"
    dicom_site.write_text(SITE_YAML.read_text()
                          .replace("${PEMMA_IBSI_DICOM_ROOT:-../../../shared/data/ibsi-sts-dicom}", str(dicom_root))
                          .replace("manifest: manifest.csv", f"manifest: {SITE_YAML.parent / 'manifest.csv'}")
                          .replace("${PEMMA_CACHE_DIR:-../../cache}/ibsi-dicom", str(tmp_path / "cache" / "dicom")))
    yamls.append(dicom_site)

    torch.manual_seed(1)
    backbone = tmp_path / "backbone.safetensors"  # a random frozen backbone: no pretraining round
    spec = RunSettings().model_spec()
    save_backbone(backbone, build_backbone(spec), spec)
    settings = RunSettings(run_dir=str(tmp_path / "run"), site_configs=",".join(map(str, yamls)), rounds=1,
                           local_steps=4, batch_size=2, pretrain_rounds=0, prognosis_rounds=0, evaluate=False,
                           min_sites=3, backbone_file=str(backbone))
    configs = [{"partition-id": i, "num-partitions": len(yamls)} for i in range(len(yamls))]
    grid = InProcessGrid(make_client_app(), configs, settings.to_run_config())
    run_dir = run_federation(grid, settings, progress=None)
    record = next(r for r in run_dir.metrics()["rounds"] if r["round"] == 1)
    sites = {s["name"]: s for s in record["sites"]}
    assert sites["ibsi-dicom"]["status"] == "ok", sites["ibsi-dicom"]
    assert record["aggregated"] is True and {s["status"] for s in sites.values()} == {"ok"}
    assert (tmp_path / "cache" / "dicom" / "converted" / "STS_001" / "label.nii.gz").is_file()
