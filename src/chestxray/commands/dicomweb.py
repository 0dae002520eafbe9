"""`chestxray dicomweb URL`: analyse studies on a DICOMweb server (QIDO-RS, WADO-RS) and
post the findings back into each study (STOW-RS)."""

from __future__ import annotations

import argparse
import re
import sys
import time

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.commands.listen import add_pacs_args, import_pacs, processor_request
from chestxray.errors import ChestXrayError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dicomweb",
        help="analyse studies on a DICOMweb server and store the findings (SR) back into them",
        description="Finds the CR/DX instances of the studies (QIDO-RS), fetches them (WADO-RS), analyses "
        "each frontal chest radiograph and posts a TID 1500 SR (and with --cam, Grad-CAM Secondary "
        "Captures) into the same study (STOW-RS). A study that already has this model's SR is skipped "
        "unless --force. " + NOT_FOR_CLINICAL_USE,
    )
    p.add_argument("url", metavar="URL", help="DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", nargs="+", metavar="UID", help="these studies (Study Instance UIDs)")
    which.add_argument("--since", metavar="YYYYMMDD", help="every study from this date on")
    which.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="poll for new studies (from today, or --watch-since) every SECONDS",
    )
    p.add_argument("--watch-since", metavar="YYYYMMDD", help="with --watch: studies from this date on (default today)")
    p.add_argument("--dry-run", action="store_true", help="list what would be analysed; fetch and store nothing")
    p.add_argument("--force", action="store_true", help="analyse studies that already have this model's SR again")
    p.add_argument(
        "--auth-env",
        metavar="VAR",
        help="credentials in the environment variable VAR: user:password (basic) or a bearer token; never logged",
    )
    add_pacs_args(p)
    p.set_defaults(run=run)


def _date(text: str, flag: str) -> str:
    if not re.fullmatch(r"\d{8}", text or ""):
        raise ChestXrayError(f"{flag} {text!r}: expected a date as YYYYMMDD")
    return text


def run(args: argparse.Namespace) -> int:
    import_pacs()
    from chestxray.pacs.dicomweb import DicomwebRun, watch
    from chestxray.pacs.runtime import make_processor, stop_on_signals, temporary_spool
    from chestxray.pacs.send import StowSender

    since = _date(args.since, "--since") if args.since else None
    if args.watch is not None and args.watch <= 0:
        raise ChestXrayError("--watch needs a positive number of seconds")
    req = processor_request(args)
    req.stow = args.url
    req.spool = args.spool or temporary_spool()
    sender = StowSender(args.url, args.auth_env)
    if args.dry_run:
        from chestxray.pacs.engine import Engine

        sha = Engine(req.model, req.backend, req.device, cam=req.cam).info.sha256
        job = DicomwebRun(sender.client, None, sha, force=args.force)
    else:
        processor = make_processor(req, sender)
        job = DicomwebRun(sender.client, processor, processor.engine.info.sha256, force=args.force)
    try:
        if args.watch is not None:
            start = _date(args.watch_since, "--watch-since") if args.watch_since else time.strftime("%Y%m%d")
            with stop_on_signals() as stop:
                watch(job, start, args.watch, stop)
            return 0
        studies = args.study if args.study else job.studies_since(since or "")
        counts = job.run(studies, dry_run=args.dry_run, out=sys.stdout)
    except ChestXrayError:
        raise
    except Exception as exc:  # requests' HTTP errors name the URL (no credentials are in it)
        raise ChestXrayError(f"{args.url.split('?')[0]}: {type(exc).__name__}: {str(exc)[:200]}") from None
    verb = "would analyse" if args.dry_run else "analysed"
    print(
        f"{counts['studies']} study(ies): {counts['skipped_done']} already done, {verb} {counts['instances']} instance(s)",
        file=sys.stderr,
    )
    if not args.dry_run:
        failed = job.processor.spool.counts().get("failed", 0) if job.processor else 0
        return 1 if failed else 0
    return 0
