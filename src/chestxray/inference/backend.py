"""The backend contract: all that the Analyzer, the bulk pipeline, Grad-CAM and the server ask
of what runs the network. `probabilities` or `run` is required; every other member defaults
to "this backend has no such capability"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from chestxray.errors import ChestXrayError


class Backend:
    """Runs the network: (N, 1, S, S) float32 in [0, 1] -> (N, C) probabilities."""

    name: str = "backend"
    device: Any = None  # a torch.device where the network runs on torch (CUDA batches are staged)
    model: Any = None  # the torch module, for Grad-CAM; None: no gradients here
    calibrator: Any = None  # the Calibration its probabilities include, for Grad-CAM's own
    has_score: bool = False  # `run` gives the input check's scores
    concurrent_runs: bool = False  # concurrent `run` calls are safe (the bulk pipeline's tail)
    quantization: str = "none"  # e.g. "int8 ..." for a quantized ONNX graph
    has_cam: bool = False  # `run_cam` gives class activation maps (ONNX graphs with a cam output)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, input-check scores or None) from one forward pass."""
        if type(self).probabilities is Backend.probabilities:
            raise NotImplementedError(f"{type(self).__name__} implements neither probabilities nor run")
        return self.probabilities(batch), None

    def features(self, batch: np.ndarray) -> np.ndarray:
        """(N, D) pooled feature vectors (the final layer's input)."""
        raise ChestXrayError(f"the {self.name} backend gives no feature vectors")

    def run_cam(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, (N, C, h, w) class activation maps) from one pass."""
        raise ChestXrayError(f"the {self.name} backend gives no class activation maps")

    def worker_recipe(self) -> Callable[[], Backend] | None:
        """How a bulk-predict worker process rebuilds this backend to infer itself; None: it
        cannot (a GPU, or no file to rebuild from), and this process infers."""
        return None

    def start(self) -> None:
        """Begin loading in the background (the bulk pipeline calls it before decoding)."""

    def settle(self) -> None:
        """Wait for a load that `start` began (a process must not exit during one)."""

    def loaded(self) -> Backend:
        """This backend, built: raises the error of a failed background load."""
        return self
