"""`chestxray listen`: a DICOM listener (C-STORE SCP) that analyses each frontal chest
radiograph it receives and sends the findings back as a structured report."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.commands._common import add_model_args, non_negative_int, positive_int
from chestxray.errors import ChestXrayError

if TYPE_CHECKING:
    from chestxray.pacs.runtime import ProcessorRequest


def add_pacs_args(p: argparse.ArgumentParser) -> None:
    """Options shared with `chestxray dicomweb`."""
    add_model_args(p)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default 16)")
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="decoder processes, started once (default: all cores where there are more than 2; "
        "0, the default on 2 cores: decode in the main process)",
    )
    p.add_argument(
        "--cam",
        action="store_true",
        help="also send a Secondary Capture with the Grad-CAM overlay of each positive finding (torch, or an ONNX file with a cam output)",
    )
    p.add_argument(
        "--spool",
        metavar="DIR",
        help="durable spool and journal (made mode 0700; the only place instances are written); "
        "default ~/.local/state/chestxray/spool",
    )
    p.add_argument(
        "--keep-days",
        type=float,
        default=0.0,
        metavar="N",
        help="keep spooled instances and results N days after a successful send (default 0: delete at once)",
    )
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on PORT (loopback)")
    p.add_argument(
        "--retries",
        type=positive_int,
        default=8,
        help="send attempts before an instance goes to SPOOL/failed/ (default 8)",
    )
    p.add_argument(
        "--retry-delay",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="wait before the second send attempt; doubles each time, at most 5 minutes (default 2)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "listen",
        help="DICOM listener: analyse received chest radiographs, send back a structured report",
        description="A C-STORE SCP (with C-ECHO). Each frontal chest radiograph (CR/DX) it receives is "
        "spooled, analysed and answered with a TID 1500 Comprehensive SR (and with --cam, Grad-CAM "
        "Secondary Captures) in the same study, sent by C-STORE (--send-to) or STOW-RS (--stow). "
        "Other instances are skipped with a one-line reason. " + NOT_FOR_CLINICAL_USE,
    )
    p.add_argument("--port", type=int, default=11112, help="port to listen on (default 11112)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--ae-title", default="CHESTXRAY", help="this listener's AE title (default CHESTXRAY)")
    p.add_argument("--allow", metavar="AE[@HOST],...", help="accept associations only from these calling AE titles")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--send-to", metavar="AE@HOST:PORT", help="send results by C-STORE to this node")
    dest.add_argument("--stow", metavar="URL", help="send results by STOW-RS to this DICOMweb base URL")
    p.add_argument("--auth-env", metavar="VAR", help="with --stow: credentials in $VAR (user:password, or a token)")
    p.add_argument("--tls-cert", metavar="PEM", help="TLS certificate of the listener (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="TLS private key of the listener")
    p.add_argument("--tls-ca", metavar="PEM", help="with TLS: accept only callers with a certificate signed by this CA")
    add_pacs_args(p)
    p.set_defaults(run=run)


def processor_request(args: argparse.Namespace) -> "ProcessorRequest":
    from chestxray.pacs.runtime import ProcessorRequest

    return ProcessorRequest(
        model=args.model,
        backend=args.backend,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        cam=args.cam,
        spool=args.spool,
        keep_days=args.keep_days,
        send_to=getattr(args, "send_to", None),
        stow=getattr(args, "stow", None),
        auth_env=args.auth_env,
        calling_ae=getattr(args, "ae_title", "CHESTXRAY"),
        metrics_port=args.metrics_port,
        retries=args.retries,
        retry_base=args.retry_delay,
    )


def import_pacs() -> None:
    try:
        import dicomweb_client  # noqa: F401
        import highdicom  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError as exc:
        raise ChestXrayError(
            f"this command needs the pacs extra ({exc.name} is missing): pip install 'chestxray[pacs]'"
        ) from None


def run(args: argparse.Namespace) -> int:
    import_pacs()
    from chestxray.pacs.listener import Allowed, Listener, serve, tls_context
    from chestxray.pacs.runtime import make_processor, stop_on_signals

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ChestXrayError("--tls-cert and --tls-key go together")
    if args.auth_env and not args.stow:
        raise ChestXrayError("--auth-env applies to --stow")
    allow = Allowed.parse_list(args.allow) if args.allow else []
    ssl_context = tls_context(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    processor = make_processor(processor_request(args))
    listener = Listener(
        processor, host=args.host, port=args.port, ae_title=args.ae_title, allow=allow, ssl_context=ssl_context
    )
    with stop_on_signals() as stop:
        serve(listener, stop)
    return 0
