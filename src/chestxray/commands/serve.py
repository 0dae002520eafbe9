"""`chestxray serve`: the web viewer and REST API on uvicorn (loopback by default)."""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from chestxray.commands._common import add_model_args, resolve_device_arg
from chestxray.errors import ChestXrayError

if TYPE_CHECKING:
    from chestxray.serve.runtime import ServeSettings

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="web viewer and REST API: upload an X-ray, see findings and Grad-CAM overlays",
        description="Serve a model over HTTP: a one-page viewer at / and a REST API under /api/v1 "
        "(schema at /openapi.json). Uploads stay in memory and are never logged.",
    )
    add_model_args(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; the server has no "
        "authentication, so think twice before 0.0.0.0)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks any free port)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload in MiB (default 20)")
    p.add_argument(
        "--access-log",
        action="store_true",
        help="log one JSON line per request: request id, route template, status, timings (no file "
        "names, query values or analysis ids)",
    )
    pacs = p.add_argument_group("studies on a PACS (the pacs extra)")
    pacs.add_argument(
        "--dicomweb",
        metavar="URL",
        help="add a Studies page: the chest radiograph studies of this DICOMweb server (QIDO-RS), "
        "opened (WADO-RS) and analysed in the viewer, results sent back as a DICOM SR (STOW-RS)",
    )
    pacs.add_argument(
        "--auth-env",
        metavar="VAR",
        help="with --dicomweb: credentials in the environment variable VAR, user:password (basic) or a "
        "bearer token; never logged",
    )
    pacs.add_argument(
        "--show-patient-names",
        action="store_true",
        help="with --dicomweb: show patient names on the Studies page (never logged; hidden by default)",
    )
    g = p.add_argument_group("load limits (per worker)")
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes, each with its own model (default 1; see the README: analyses kept "
        "for the viewer are only found by the worker that made them, so use 1 for the viewer)",
    )
    g.add_argument(
        "--queue-length",
        type=int,
        default=64,
        help="uploads in progress at once; more get 503 with Retry-After (default 64)",
    )
    g.add_argument(
        "--request-deadline-s",
        type=float,
        default=30.0,
        help="an upload not decoded and analysed within this many seconds gets 503 (default 30)",
    )
    g.add_argument("--max-batch", type=int, default=16, help="images per inference batch (default 16; 1: no batching)")
    g.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long the first request of a batch waits for others (default 5 ms)",
    )
    g.add_argument("--decode-threads", type=int, default=None, help="images decoded at once (default: CPU cores)")
    g.add_argument(
        "--max-decode-mb",
        type=float,
        default=128.0,
        help="refuse (413) images whose decoded size, width x height x channels x bytes per sample "
        "from the header, exceeds this many MiB (default 128)",
    )
    g.add_argument(
        "--max-dicom-elements",
        type=int,
        default=20_000,
        help="refuse (413) DICOM uploads whose header holds more data elements (default 20000)",
    )
    g.add_argument(
        "--header-timeout-s",
        type=float,
        default=10.0,
        help="close (408) connections whose request line and headers take longer than this many seconds "
        "to arrive (default 10)",
    )
    g.add_argument(
        "--body-timeout-s", type=float, default=60.0, help="answer 408 to uploads whose body takes longer (default 60)"
    )
    g.add_argument(
        "--max-receiving",
        type=int,
        default=128,
        help="upload bodies received at once, before any queue place is taken; more get 503 (default 128)",
    )
    g.add_argument(
        "--max-receiving-per-client",
        type=int,
        default=16,
        help="upload bodies received at once from one client address; more get 503 (default 16)",
    )
    g.add_argument(
        "--min-receive-kib-s",
        type=float,
        default=8.0,
        help="answer 408 to upload bodies that arrive slower than this, after the first 5 s (default 8 KiB/s)",
    )
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> "ServeSettings":
    from chestxray.serve.runtime import ServeSettings

    extra = {} if args.decode_threads is None else {"decode_threads": args.decode_threads}
    for flag in ("max_upload_mb", "max_decode_mb", "min_receive_kib_s", "max_wait_ms"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0 or (value == 0 and flag.endswith("_mb")):
            kind = "a positive number" if flag.endswith("_mb") else "a number >= 0"
            raise ChestXrayError(f"--{flag.replace('_', '-')} must be {kind}, got {value}")
    try:
        return ServeSettings(
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            max_decode_bytes=int(args.max_decode_mb * 2**20),
            max_dicom_elements=args.max_dicom_elements,
            max_receiving=args.max_receiving,
            max_receiving_per_client=args.max_receiving_per_client,
            min_receive_rate=args.min_receive_kib_s * 1024,
            queue_length=args.queue_length,
            request_deadline_s=args.request_deadline_s,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            header_timeout_s=args.header_timeout_s,
            body_timeout_s=args.body_timeout_s,
            **extra,
        )
    except ValueError as exc:  # "<field> must be ...": name the flag instead
        field, _, rest = str(exc).partition(" ")
        raise ChestXrayError(f"--{field.replace('_', '-')} {rest}") from None


class RedactAccessLog(logging.Filter):
    """uvicorn's access log prints the full request target; keep the path only, and hide the
    analysis ids (they grant access to an uploaded image for a few minutes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_path(args[2]), *args[3:])
        return True


def redact_path(target: str) -> str:
    path = target.split("?", 1)[0]
    parts = path.split("/")
    for i, part in enumerate(parts[:-1]):
        if part == "analyses" and parts[i + 1]:
            parts[i + 1] = "<id>"
    return "/".join(parts)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port, bound here rather than by uvicorn so that the
    URL printed shows the real port when --port 0 let the system pick one, and so that a
    port in use is a one-line error (uvicorn logs it and exits)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ChestXrayError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from chestxray.serve.app import create_app
    except ImportError as exc:
        raise ChestXrayError(
            f"serving needs the serve extra: pip install 'chestxray[serve]' ({exc.name} missing)"
        ) from None
    from chestxray.inference.predict import Analyzer

    if not 0 <= args.port < 65536:
        raise ChestXrayError(f"--port must lie in 0..65535 (0: any free port), got {args.port}")
    if args.workers < 1:
        raise ChestXrayError(f"--workers must be at least 1, got {args.workers}")
    settings = settings_from_args(args)
    check_study_args(args)
    from chestxray.inference.predict import resolve_backend
    from chestxray.serve.metrics import ACCESS_LOG
    from chestxray.serve.protocol import HEADER_TIMEOUT_ENV, HeaderTimeoutH11Protocol

    backend = resolve_backend(args.model, args.backend)
    device = resolve_device_arg(args.device, backend)
    analyzer = Analyzer.load(args.model, backend=backend, device=device)  # fails here, before any worker starts
    from chestxray.pacs.engine import model_file

    path = model_file(args.model, backend)  # names the model in the viewer's DICOM SRs
    studies = study_source(args, analyzer, path)
    if not is_loopback(args.host):
        log.warning(
            "listening on %s: anyone who can reach this address can upload images; the server has no authentication",
            args.host,
        )
    sock = bind(args.host, args.port)
    port = int(sock.getsockname()[1])
    shown = f"[{args.host}]" if ":" in args.host else args.host
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    print(
        f"chestxray serve: model {analyzer.name} ({analyzer.variant}{workers}) at http://{shown}:{port}/ "
        f"(API schema /openapi.json). Not for clinical use. Ctrl-C stops.",
        file=sys.stderr,
        flush=True,
    )
    HeaderTimeoutH11Protocol.header_timeout_s = settings.header_timeout_s
    os.environ[HEADER_TIMEOUT_ENV] = str(settings.header_timeout_s)  # for --workers processes
    common: dict[str, Any] = dict(
        host=args.host,
        port=port,
        access_log=False,  # our own access line (serve/metrics.py) replaces uvicorn's
        log_level="info",
        server_header=False,
        http=HeaderTimeoutH11Protocol,
        log_config=_log_config(args.access_log, ACCESS_LOG),
    )
    try:
        if args.workers == 1:
            app = create_app(
                analyzer,
                settings=settings,
                model_file=path,
                studies=studies,
                show_patient_names=args.show_patient_names,
            )
            config = uvicorn.Config(app, **common)
            access = logging.getLogger("uvicorn.access")  # after Config has set up uvicorn's logging
            if not any(isinstance(f, RedactAccessLog) for f in access.filters):
                access.addFilter(RedactAccessLog())
            uvicorn.Server(config).run(sockets=[sock])
            return 0
        del analyzer  # each worker loads its own copy
        from uvicorn.supervisors import Multiprocess

        from chestxray.serve.app import CONFIG_ENV

        model = str(args.model) if args.model is not None else None
        os.environ[CONFIG_ENV] = json.dumps(
            {"model": model, "backend": backend, "device": device, "settings": settings.to_dict()}
        )
        # prometheus-client's multiprocess mode: every worker writes its figures to files here
        # and /metrics adds them up; a fresh folder per run so old figures never count.
        metrics_dir = tempfile.mkdtemp(prefix="chestxray-metrics-")
        atexit.register(shutil.rmtree, metrics_dir, True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        config = uvicorn.Config("chestxray.serve.app:app_from_env", factory=True, workers=args.workers, **common)
        import inspect

        if "target" in inspect.signature(Multiprocess).parameters:  # older uvicorn
            Multiprocess(config, target=uvicorn.Server(config).run, sockets=[sock]).run()  # type: ignore[call-arg]
        else:
            Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
    return 0


def check_study_args(args: argparse.Namespace) -> None:
    """The --dicomweb options' errors, before the model is loaded."""
    if args.dicomweb is None:
        if args.auth_env or args.show_patient_names:
            raise ChestXrayError("--auth-env and --show-patient-names go with --dicomweb URL")
        return
    if args.workers != 1:
        raise ChestXrayError(
            "--dicomweb needs --workers 1: a study opened in the viewer is analysed and kept by one worker"
        )
    if not args.dicomweb.startswith(("http://", "https://")):
        raise ChestXrayError("--dicomweb: expected an http:// or https:// URL")  # not echoed: it may hold a password
    from chestxray.commands.listen import import_pacs

    import_pacs()
    if args.auth_env and not os.environ.get(args.auth_env):
        raise ChestXrayError(f"--auth-env {args.auth_env}: the environment variable is not set or empty")


def study_source(args: argparse.Namespace, analyzer: Any, path: Any) -> Any:
    """The PACS behind the Studies page (`--dicomweb`), or None."""
    if args.dicomweb is None:
        return None
    from chestxray.pacs.engine import model_info
    from chestxray.pacs.runtime import QUIET_LOGGERS
    from chestxray.pacs.studies import DicomwebStudies

    for name in QUIET_LOGGERS:  # their records quote URLs with study UIDs and dataset contents
        logging.getLogger(name).setLevel(logging.WARNING)
    info = model_info(analyzer, path, str(analyzer.backend.name))
    return DicomwebStudies(args.dicomweb, info, args.auth_env, patient_names=args.show_patient_names)


def _log_config(access_log: bool, logger_name: str) -> dict[str, Any]:
    """uvicorn's logging setup plus our access logger (on with --access-log); applied in each worker too."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"][logger_name] = {
        "handlers": ["default"],
        "level": "INFO" if access_log else "WARNING",
        "propagate": False,
    }
    return config
