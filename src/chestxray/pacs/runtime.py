"""What the `listen` and `dicomweb` commands share: a typed request, turned into a running
`Processor` (model, spool, destination, metrics)."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chestxray.pacs.engine import Engine
from chestxray.pacs.metrics import PacsMetrics
from chestxray.pacs.send import CStoreSender, Node, Sender, StowSender
from chestxray.pacs.service import Processor, RetryPolicy
from chestxray.pacs.spool import Spool

log = logging.getLogger("chestxray.pacs")


@dataclass
class ProcessorRequest:
    model: str | None = None
    backend: str = "auto"
    device: str = "cpu"
    batch_size: int = 16
    workers: int | None = None
    cam: bool = False
    spool: str | None = None
    keep_days: float = 0.0
    send_to: str | None = None
    stow: str | None = None
    auth_env: str | None = None
    calling_ae: str = "CHESTXRAY"
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    retries: int = 8
    retry_base: float = 2.0


def make_sender(req: ProcessorRequest) -> Sender:
    if req.stow:
        return StowSender(req.stow, req.auth_env)
    if req.send_to:
        return CStoreSender(Node.parse(req.send_to), calling_ae=req.calling_ae)
    from chestxray.errors import ChestXrayError

    raise ChestXrayError("give a destination: --send-to AE@HOST:PORT or --stow URL")


def default_spool() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "chestxray" / "spool"


# Their INFO/DEBUG records quote UIDs and dataset contents (highdicom names the source instance).
QUIET_LOGGERS = ("highdicom", "pynetdicom", "pydicom", "dicomweb_client", "urllib3")


def quiet_library_logs() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # The core warns about each unreadable input; the processor logs the skip itself.
    logging.getLogger("chestxray.inference.predict").setLevel(logging.ERROR)


def make_processor(req: ProcessorRequest, sender: Sender | None = None) -> Processor:
    quiet_library_logs()
    spool = Spool(req.spool or default_spool())
    engine = Engine(req.model, req.backend, req.device, req.batch_size, cam=req.cam)
    metrics = PacsMetrics()
    if req.metrics_port is not None:
        metrics.serve(req.metrics_port, req.metrics_host)
    return Processor(
        engine,
        spool,
        sender or make_sender(req),
        cam=req.cam,
        metrics=metrics,
        retry=RetryPolicy(attempts=req.retries, base=req.retry_base),
        batch_size=req.batch_size,
        keep_days=req.keep_days,
        workers=req.workers,
    )


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT (the work in flight then finishes or stays journaled)."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        log.info("signal %d: finishing the step in progress", signum)
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def temporary_spool() -> str:
    return tempfile.mkdtemp(prefix="chestxray-spool-")
