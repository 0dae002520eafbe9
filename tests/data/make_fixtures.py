"""Build the small dataset fixtures of tests/data from the real NIH pixels of nih-mini.

Each fixture follows its dataset's published layout and file type:
  chexpert-mini/  CheXpert-v1.0-small/{train,valid}.csv + JPEGs (valid = NIH's official test)
  mimic-mini/     mimic-cxr-2.0.0-{chexpert,metadata,split}.csv.gz + files/pXX/pSUBJECT/sSTUDY/ID.jpg
  padchest-mini/  PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz + 16-bit PNGs in ImageDir folders
  vindr-mini/     train.csv.gz (3 radiologists per image, boxes) + train/<image_id>.dicom
  csv-mini/       labels.csv ('|' findings column) + PNGs
Labels are the NIH labels of each image, written in the target dataset's vocabulary. Run
from the repository root: `python tests/data/make_fixtures.py` (deterministic; rewrites them).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parent
NIH = DATA / "nih-mini"

# The layouts below are written from each dataset's published description, on purpose not
# from the readers' own constants, so a reader that got a name wrong fails on its fixture.
CHEXPERT_COLUMNS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
NIH_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
}
NIH_TO_PADCHEST = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Effusion": "pleural effusion",
    "Infiltration": "infiltrates",
    "Mass": "mass",
    "Nodule": "nodule",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Consolidation": "consolidation",
    "Edema": "pulmonary edema",
    "Emphysema": "emphysema",
    "Fibrosis": "pulmonary fibrosis",
    "Pleural_Thickening": "pleural thickening",
    "Hernia": "hiatal hernia",
}
NIH_TO_VINDR = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural effusion",
    "Infiltration": "Infiltration",
    "Mass": "Nodule/Mass",
    "Nodule": "Nodule/Mass",
    "Consolidation": "Consolidation",
    "Pleural_Thickening": "Pleural thickening",
    "Pneumothorax": "Pneumothorax",
    "Fibrosis": "Pulmonary fibrosis",
}
VINDR_IDS = {
    name: i
    for i, name in enumerate(
        [
            "Aortic enlargement",
            "Atelectasis",
            "Calcification",
            "Cardiomegaly",
            "Consolidation",
            "ILD",
            "Infiltration",
            "Lung Opacity",
            "Nodule/Mass",
            "Other lesion",
            "Pleural effusion",
            "Pleural thickening",
            "Pneumothorax",
            "Pulmonary fibrosis",
        ]
    )
}


def nih_rows() -> list[dict[str, str]]:
    with open(NIH / "Data_Entry_2017.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    test = set((NIH / "test_list.txt").read_text().split())
    for r in rows:
        r["split"] = "test" if r["Image Index"] in test else "train_val"
        r["findings"] = [] if r["Finding Labels"] == "No Finding" else r["Finding Labels"].split("|")
    return rows


def gray(name: str, size: int | None = None) -> Image.Image:
    im = Image.open(NIH / "images" / name).convert("L")
    return im.resize((size, size), Image.Resampling.BILINEAR) if size else im


def write_gz_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    # mtime=0: the same bytes on every run.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as fh:
        fh.write(buf.getvalue().encode())


def chexpert_values(findings: list[str]) -> dict[str, str]:
    """CheXpert columns of an NIH label: blanks for 'No Finding' rows (as CheXpert writes
    them), explicit 1/0 for the seven shared observations otherwise."""
    if not findings:
        return {c: ("1.0" if c == "No Finding" else "") for c in CHEXPERT_COLUMNS}
    out = {c: "" for c in CHEXPERT_COLUMNS}
    for nih, col in NIH_TO_CHEXPERT.items():
        out[col] = "1.0" if nih in findings else "0.0"
    return out


def make_chexpert(rows: list[dict[str, str]]) -> None:
    root = DATA / "chexpert-mini"
    shutil.rmtree(root, ignore_errors=True)
    release = root / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS]
    train = [r for r in rows if r["split"] == "train_val"][:24]
    valid = [r for r in rows if r["split"] == "test"]
    for part, chosen in (("train", train), ("valid", valid)):
        lines = []
        for k, r in enumerate(chosen):
            rel = f"CheXpert-v1.0-small/{part}/patient{int(r['Patient ID']):05d}/study{int(r['Follow-up #']) + 1}"
            (root / rel).mkdir(parents=True, exist_ok=True)
            gray(r["Image Index"]).save(root / rel / "view1_frontal.jpg", quality=95)
            values = chexpert_values(r["findings"])
            if part == "train" and k % 5 == 1 and values["Edema"] == "0.0":
                values["Edema"] = "-1.0"  # uncertain, as the labeler writes it
            sex = {"M": "Male", "F": "Female"}[r["Patient Gender"]]
            lines.append(
                [f"{rel}/view1_frontal.jpg", sex, r["Patient Age"], "Frontal", r["View Position"]]
                + [values[c] for c in CHEXPERT_COLUMNS]
            )
            if part == "train" and k == 0:  # one lateral view, the frontal mirrored
                gray(r["Image Index"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
                    root / rel / "view2_lateral.jpg", quality=95
                )
                lines.append([f"{rel}/view2_lateral.jpg", sex, r["Patient Age"], "Lateral", ""] + lines[-1][5:])
        with open(release / f"{part}.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(header)
            w.writerows(lines)


def dicom_like_id(name: str) -> str:
    h = hashlib.sha1(name.encode()).hexdigest()
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


def make_mimic(rows: list[dict[str, str]]) -> None:
    root = DATA / "mimic-mini"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    chosen = [r for r in rows if r["split"] == "train_val"][24:32] + [r for r in rows if r["split"] == "test"][:4]
    labels, meta, split = [], [], []
    for k, r in enumerate(chosen):
        subject = 10000000 + int(r["Patient ID"])
        study = 50000000 + k
        dicom = dicom_like_id(r["Image Index"])
        folder = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True)
        gray(r["Image Index"], 128).save(folder / f"{dicom}.jpg", quality=95)
        meta.append([dicom, subject, study, "CHEST (PA AND LAT)", r["View Position"], 128, 128, 21800101, 120000.0])
        split.append(
            [
                dicom,
                study,
                subject,
                "test" if r["split"] == "test" else ("validate" if int(r["Patient ID"]) % 3 == 0 else "train"),
            ]
        )
        if k == 5:
            continue  # a study without a label row (the labeler found no report section)
        values = chexpert_values(r["findings"])
        labels.append([subject, study] + [values[c] for c in CHEXPERT_COLUMNS])
    write_gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_COLUMNS], labels)
    write_gz_csv(
        root / "mimic-cxr-2.0.0-metadata.csv.gz",
        [
            "dicom_id",
            "subject_id",
            "study_id",
            "PerformedProcedureStepDescription",
            "ViewPosition",
            "Rows",
            "Columns",
            "StudyDate",
            "StudyTime",
        ],
        meta,
    )
    write_gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split)


def make_padchest(rows: list[dict[str, str]]) -> None:
    root = DATA / "padchest-mini"
    shutil.rmtree(root, ignore_errors=True)
    chosen = rows[40:50]
    header = [
        "ImageID",
        "ImageDir",
        "StudyDate_DICOM",
        "StudyID",
        "PatientID",
        "PatientBirth",
        "PatientSex_DICOM",
        "ViewPosition_DICOM",
        "Projection",
        "MethodProjection",
        "Labels",
        "Localizations",
        "LabelsLocalizationsBySentence",
        "labelCUIS",
        "LocalizationsCUIS",
    ]
    out = []
    for k, r in enumerate(chosen):
        image_id = f"2168401113669640{int(r['Patient ID']):012d}{k:04d}_00-{k:03d}-000.png"
        image_dir = k % 2
        (root / str(image_dir)).mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(gray(r["Image Index"], 128), dtype=np.uint16) * 257  # full 16-bit range
        Image.fromarray(pixels).save(root / str(image_dir) / image_id)
        terms = [NIH_TO_PADCHEST[f] for f in r["findings"]] or ["normal"]
        label_text = repr(terms)
        if k == 8:
            label_text = "['normal'"  # truncated list: must be reported and skipped, not guessed
        study_year = 2015
        out.append(
            [
                image_id,
                image_dir,
                f"{study_year}0312",
                f"study{k}",
                f"pat{r['Patient ID']}",
                study_year - int(r["Patient Age"]),
                r["Patient Gender"],
                "POSTEROANTERIOR",
                r["View Position"],
                "Manual review of DICOM fields",
                label_text,
                "[]",
                "[]",
                "[]",
                "[]",
            ]
        )
    write_gz_csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", header, out)


def make_vindr(rows: list[dict[str, str]]) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    root = DATA / "vindr-mini"
    shutil.rmtree(root, ignore_errors=True)
    (root / "train").mkdir(parents=True)
    chosen = rows[50:60]
    out = []
    for k, r in enumerate(chosen):
        image_id = hashlib.md5(r["Image Index"].encode()).hexdigest()
        pixels = np.asarray(gray(r["Image Index"], 128), dtype=np.uint16) * 16  # 12-bit, as VinDr stores
        photometric = "MONOCHROME1" if k == 3 else "MONOCHROME2"
        if photometric == "MONOCHROME1":
            pixels = 4095 - pixels
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[image_id])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(root / "train" / f"{image_id}.dicom"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality = "DX"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.astype("<u2").tobytes()
        ds.save_as(root / "train" / f"{image_id}.dicom", enforce_file_format=True)
        classes = sorted({NIH_TO_VINDR[f] for f in r["findings"] if f in NIH_TO_VINDR})
        for reader in ("R8", "R9", "R10"):
            said = classes if reader != "R10" else classes[:1]  # the third reader names one finding at most
            if not said:
                out.append([image_id, "No finding", 14, reader, "", "", "", ""])
            for c in said:
                out.append([image_id, c, VINDR_IDS[c], reader, 20.0 + k, 30.0, 90.0, 100.0 + k])
    write_gz_csv(
        root / "train.csv.gz", ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"], out
    )
    del pydicom


def make_csv(rows: list[dict[str, str]]) -> None:
    root = DATA / "csv-mini"
    shutil.rmtree(root, ignore_errors=True)
    (root / "images").mkdir(parents=True)
    chosen = rows[60:72]
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file", "findings", "patient", "sex", "age", "view", "split"])
        for r in chosen:
            gray(r["Image Index"], 128).save(root / "images" / r["Image Index"])
            split = "test" if r["split"] == "test" else ("val" if int(r["Patient ID"]) % 4 == 3 else "train")
            w.writerow(
                [
                    f"images/{r['Image Index']}",
                    r["Finding Labels"],
                    r["Patient ID"],
                    r["Patient Gender"],
                    r["Patient Age"],
                    r["View Position"],
                    split,
                ]
            )


if __name__ == "__main__":
    nih = nih_rows()
    make_chexpert(nih)
    make_mimic(nih)
    make_padchest(nih)
    make_vindr(nih)
    make_csv(nih)
    for d in ("chexpert-mini", "mimic-mini", "padchest-mini", "vindr-mini", "csv-mini"):
        size = sum(p.stat().st_size for p in (DATA / d).rglob("*") if p.is_file())
        print(f"{d}: {size / 1e6:.2f} MB")
