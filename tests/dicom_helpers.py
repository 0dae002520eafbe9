"""DICOM files built in memory for the image-reading and viewer tests."""

from __future__ import annotations

import io

import numpy as np


def dicom_bytes(
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    lut: np.ndarray | None = None,
    pixels: bool = True,
    preamble: bool = True,
) -> bytes:
    """A DX DICOM of `stored` values with the given value transforms and a patient name."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", "ID-4711-SECRET", "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    alloc = 8 if bits <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = alloc, bits, bits - 1, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if lut is not None:
        item = Dataset()
        lut_bits = 8 if lut.max() < 256 else 16
        item.LUTDescriptor = [len(lut), 0, lut_bits]
        if lut_bits == 8:  # LUT Data as a list of US values, or as OW bytes
            item.add_new(0x00283006, "US", [int(v) for v in lut])
        else:
            item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())
        ds.VOILUTSequence = Sequence([item])
    if pixels:
        ds.PixelData = np.ascontiguousarray(stored.astype(np.uint8 if alloc == 8 else np.uint16)).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble)
    return buf.getvalue()
