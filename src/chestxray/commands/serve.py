"""`chestxray serve`: the web viewer and REST API on uvicorn (loopback by default)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys

from chestxray.commands._common import add_model_args, resolve_device_arg
from chestxray.errors import ChestXrayError

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
        help="log one line per request (path only: query strings and analysis ids are cut)",
    )
    p.set_defaults(run=run)


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
    if args.max_upload_mb <= 0:
        raise ChestXrayError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    from chestxray.inference.predict import resolve_backend

    backend = resolve_backend(args.model, args.backend)
    analyzer = Analyzer.load(args.model, backend=backend, device=resolve_device_arg(args.device, backend))
    app = create_app(analyzer, max_upload_bytes=int(args.max_upload_mb * 2**20))
    if not is_loopback(args.host):
        log.warning(
            "listening on %s: anyone who can reach this address can upload images; the server has no authentication",
            args.host,
        )
    sock = bind(args.host, args.port)
    port = int(sock.getsockname()[1])
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"chestxray serve: model {analyzer.name} ({analyzer.variant}) at http://{shown}:{port}/ "
        f"(API schema /openapi.json). Not for clinical use. Ctrl-C stops.",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app, host=args.host, port=port, access_log=args.access_log, log_level="info", server_header=False
    )
    access = logging.getLogger("uvicorn.access")  # after Config has set up uvicorn's logging
    if not any(isinstance(f, RedactAccessLog) for f in access.filters):
        access.addFilter(RedactAccessLog())
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
