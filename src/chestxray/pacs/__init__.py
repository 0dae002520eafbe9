"""Hospital integration: DICOM results (TID 1500 SR, Grad-CAM Secondary Captures), a DIMSE
listener and a DICOMweb client, beside `serve/`. Needs the `pacs` extra (pynetdicom,
highdicom, dicomweb-client). Lower layers never import this package."""
