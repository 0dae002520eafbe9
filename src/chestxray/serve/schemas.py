"""Pydantic models of the REST API; they are what /openapi.json documents."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class FindingOut(BaseModel):
    finding: str = Field(description="one of the model's labels")
    probability: float = Field(ge=0.0, le=1.0)
    threshold: float = Field(ge=0.0, le=1.0, description="decision threshold of this finding, from the bundle")
    positive: bool = Field(description="probability >= threshold")


class PredictionOut(BaseModel):
    """The same document as `chestxray predict --format json` gives for one image."""

    file: str = Field(description='always "upload": the client\'s file name is never used or echoed')
    model: str
    variant: str = Field(
        "", description='the build that ran: "pytorch float32", "onnx float32" or "onnx int8" (the packaged ONNX model)'
    )
    findings: list[FindingOut] = Field(description="positives first, then by probability")
    error: str | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="shown next to the findings: the input is unlike the training X-rays (with its score), "
        "appears turned or inverted, or its DICOM header says lateral view / not chest",
    )
    threshold_policy: str | None = Field(default=None, description="how the thresholds were chosen, e.g. f1")


class AnalysisOut(BaseModel):
    """A prediction plus links to the decoded image and to Grad-CAM overlays, kept in memory for a while."""

    id: str
    expires_in_s: int = Field(description="the image is forgotten after this many seconds (or on DELETE)")
    width: int
    height: int
    image_url: str = Field(description="the decoded grayscale image as PNG (browsers cannot show DICOM)")
    cam_url: str | None = Field(
        description="append ?finding=NAME for that finding's Grad-CAM overlay as PNG; "
        "null when the backend has no Grad-CAM (ONNX)"
    )
    prediction: PredictionOut


class ModelOut(BaseModel):
    name: str
    backend: str
    variant: str = Field(description='"pytorch float32", "onnx float32" or "onnx int8"')
    labels: list[str]
    thresholds: dict[str, float]
    threshold_method: str
    preprocessing: dict[str, Any]
    metrics: dict[str, Any]
    training: dict[str, Any]
    grad_cam: bool = Field(description="whether the /cam endpoints are available")
    calibration: dict[str, Any] | None = Field(default=None, description="the per-finding calibrator, if any")
    operating_point: dict[str, Any] | None = Field(
        default=None, description="threshold policy and the validation sensitivity/specificity it achieved"
    )
    input_check: dict[str, Any] | None = Field(default=None, description="the input check's cut-off and provenance")
    max_upload_bytes: int
    note: str


class HealthOut(BaseModel):
    status: str
    model: str


class ReadyOut(BaseModel):
    ready: bool
    model_loaded: bool
    queue: int
    queue_length: int


class ErrorOut(BaseModel):
    detail: str
