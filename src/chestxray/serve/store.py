"""Short-lived, in-memory analyses for the viewer: the decoded image and its prediction,
so that Grad-CAM overlays can be asked for without uploading the image again.

Nothing is written to disk. Entries expire after `ttl_s` seconds, can be deleted by the
client, and the oldest are dropped once the total size passes `max_bytes`.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chestxray.inference.predict import Prediction


@dataclass
class Analysis:
    gray: np.ndarray  # the decoded original, what Grad-CAM runs on
    display: np.ndarray  # downscaled copy for the browser
    prediction: Prediction
    cams: dict[str, bytes] = field(default_factory=dict)  # finding -> overlay PNG
    notes: dict[str, str] = field(default_factory=dict)  # finding -> "no positive evidence for X"
    created: float = 0.0
    # The viewer's own data (the full-depth pixels, colour heat maps): anything with an `nbytes`.
    viewer: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        extra = sum(int(getattr(v, "nbytes", 0)) for v in self.viewer.values())
        return int(self.gray.nbytes + self.display.nbytes + sum(len(b) for b in self.cams.values()) + extra)


class ResultStore:
    def __init__(
        self, ttl_s: float = 600.0, max_bytes: int = 256 * 2**20, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, Analysis] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def add(self, analysis: Analysis) -> str:
        key = secrets.token_urlsafe(16)
        with self._lock:
            analysis.created = self._clock()
            self._items[key] = analysis
            self._expire()
            self._shrink()
        return key

    def get(self, key: str) -> Analysis | None:
        with self._lock:
            self._expire()
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def add_cam(self, key: str, finding: str, png: bytes, note: str | None = None) -> None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                item.cams[finding] = png
                if note:
                    item.notes[finding] = note
                self._shrink()

    def remove(self, key: str) -> bool:
        with self._lock:
            return self._items.pop(key, None) is not None

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, a in self._items.items() if now - a.created > self.ttl_s]:
            del self._items[key]

    def _shrink(self) -> None:
        total = sum(a.nbytes for a in self._items.values())
        while total > self.max_bytes and len(self._items) > 1:
            _, oldest = self._items.popitem(last=False)
            total -= oldest.nbytes
