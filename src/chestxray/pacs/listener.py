"""The DIMSE listener: a C-STORE SCP with C-ECHO (pynetdicom) feeding a `Processor`."""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import uid as uids

from chestxray.errors import ChestXrayError
from chestxray.pacs.send import no_delay
from chestxray.pacs.service import Processor
from chestxray.pacs.spool import short_hash

log = logging.getLogger("chestxray.pacs")

# Accepted when pydicom can decode them here (`supported_transfer_syntaxes`).
CANDIDATE_SYNTAXES = (
    uids.ExplicitVRLittleEndian,
    uids.ImplicitVRLittleEndian,
    uids.DeflatedExplicitVRLittleEndian,
    uids.ExplicitVRBigEndian,
    uids.RLELossless,
    uids.JPEGBaseline8Bit,
    uids.JPEGExtended12Bit,
    uids.JPEGLossless,
    uids.JPEGLosslessSV1,
    uids.JPEGLSLossless,
    uids.JPEGLSNearLossless,
    uids.JPEG2000Lossless,
    uids.JPEG2000,
    uids.HTJ2KLossless,
    uids.HTJ2KLosslessRPCL,
    uids.HTJ2K,
)


def supported_transfer_syntaxes() -> list[str]:
    """The candidate syntaxes whose pixel data pydicom can decode with the plugins installed."""
    from pydicom.pixels import get_decoder

    out = []
    for ts in CANDIDATE_SYNTAXES:
        try:
            if not ts.is_compressed or get_decoder(ts).is_available:
                out.append(str(ts))
        except NotImplementedError:
            continue
    return out


@dataclass(frozen=True)
class Allowed:
    ae_title: str
    host: str | None

    @classmethod
    def parse_list(cls, text: str) -> list["Allowed"]:
        out = []
        for item in (t.strip() for t in text.split(",")):
            if not item:
                continue
            ae, _, host = item.partition("@")
            if not ae or len(ae) > 16:
                raise ChestXrayError(f"--allow {item!r}: expected AE[@HOST] with an AE title of 1 to 16 characters")
            out.append(cls(ae, host or None))
        if not out:
            raise ChestXrayError("--allow needs at least one AE title")
        return out


def tls_context(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    """Server-side TLS; with a CA, callers must present a certificate it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
        if ca:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ChestXrayError(f"--tls-cert/--tls-key/--tls-ca: cannot load ({exc})") from None
    return ctx


class Listener:
    """C-STORE SCP and C-ECHO on `host:port` under `ae_title`."""

    def __init__(
        self,
        processor: Processor,
        *,
        host: str = "127.0.0.1",
        port: int = 11112,
        ae_title: str = "CHESTXRAY",
        allow: Sequence[Allowed] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.processor = processor
        self.host, self.port, self.ae_title = host, port, ae_title
        self.allow = list(allow)
        self.ssl_context = ssl_context
        self.server: Any = None

    def _ae(self) -> Any:
        from pynetdicom import AE, AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        syntaxes = supported_transfer_syntaxes()
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0
        if self.allow:
            ae.require_calling_aet = sorted({a.ae_title for a in self.allow})
        return ae

    def _permitted(self, event: Any) -> bool:
        if not self.allow:
            return True
        calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        address = str(event.assoc.requestor.address)
        return any(a.ae_title == calling and (a.host is None or a.host == address) for a in self.allow)

    def on_requested(self, event: Any) -> None:
        if not self._permitted(event):
            log.warning("refused an association from %s (not in --allow)", event.assoc.requestor.address)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent; service user; calling AE not recognised

    def on_echo(self, event: Any) -> int:
        return 0x0000

    def on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop_uid = str(ds.SOPInstanceUID)
            encoded = event.encoded_dataset()
        except Exception as exc:  # a dataset pynetdicom/pydicom cannot parse
            log.warning("refused an instance that cannot be parsed (%s)", type(exc).__name__)
            self.processor.metrics.skipped.labels("unparsable").inc()
            return 0xC210
        try:
            self.processor.receive(ds, encoded)
        except Exception as exc:  # the spool is full or unwritable: the sender keeps the instance
            log.error("could not spool %s (%s)", short_hash(sop_uid), type(exc).__name__)
            return 0xA700
        return 0x0000

    def start(self) -> None:
        from pynetdicom import evt

        handlers = [
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_CONN_OPEN, no_delay),
        ]
        try:
            self.server = self._ae().start_server(
                (self.host, self.port), block=False, evt_handlers=handlers, ssl_context=self.ssl_context
            )
        except OSError as exc:
            raise ChestXrayError(f"cannot listen on {self.host}:{self.port} ({exc.strerror or exc})") from None
        self.port = int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def serve(listener: Listener, stop: threading.Event) -> None:
    """Run until `stop` is set: the SCP in its threads, the processor in this one. On stop the
    SCP closes first (no new instances), then the step in progress finishes."""
    listener.start()
    log.info(
        "listening as %s on %s:%d; results to %s",
        listener.ae_title,
        listener.host,
        listener.port,
        listener.processor.sender.describe(),
    )
    try:
        listener.processor.run(stop)
    finally:
        listener.stop()
        log.info("stopped; %d instance(s) journaled for the next start", listener.processor.pending())
