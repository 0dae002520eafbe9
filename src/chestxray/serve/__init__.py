"""The web viewer and REST API (`chestxray serve`). Needs the `serve` extra (FastAPI, uvicorn)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(analyzer: Any, **kwargs: Any) -> "FastAPI":
    """See `chestxray.serve.app.create_app` (imported lazily so the package imports without FastAPI)."""
    from chestxray.serve.app import create_app as _create_app

    return _create_app(analyzer, **kwargs)


__all__ = ["create_app"]
