"""Where results go: a DICOM node by C-STORE (`--send-to AE@HOST:PORT`) or a DICOMweb
server by STOW-RS (`--stow URL`). Credentials come from an environment variable only."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from chestxray.errors import ChestXrayError


def no_delay(event: Any) -> None:
    """pynetdicom's EVT_CONN_OPEN handler: turn Nagle's algorithm off on the association's
    socket. A DIMSE message goes out as several writes (command, then data); with Nagle on,
    each waits for the peer's delayed ACK, about 40 ms a message (measured: 10 C-STOREs/s on
    one association with it on, 80 with it off)."""
    transport = event.assoc.dul.socket  # pynetdicom's AssociationSocket; `.socket` is the TCP one
    if transport is not None and transport.socket is not None:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class SendError(Exception):
    """A send that may succeed later (destination down, refused, timed out)."""


class Sender(Protocol):
    def send(self, files: Sequence[Path]) -> None:
        """Deliver these DICOM files (Part 10) or raise SendError."""

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Node:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Node":
        m = re.fullmatch(r"([^@\s]{1,16})@([^:\s]+):(\d{1,5})", text.strip())
        if m is None:
            raise ChestXrayError(f"--send-to {text!r}: expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
        return cls(m.group(1), m.group(2), int(m.group(3)))


class CStoreSender:
    """C-STORE SCU: up to `parallel` associations per batch of results (a PACS indexes each
    stored instance for a while; several associations keep it busy)."""

    def __init__(
        self, node: Node, calling_ae: str = "CHESTXRAY", tls: Any = None, timeout: float = 30, parallel: int = 4
    ) -> None:
        self.node, self.calling_ae, self.tls, self.timeout = node, calling_ae, tls, timeout
        self.parallel = max(1, parallel)

    def describe(self) -> str:
        return f"{self.node.ae_title}@{self.node.host}:{self.node.port}"

    def send(self, files: Sequence[Path]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from pynetdicom import _config

        # pynetdicom's documented switch: stream files as stored instead of decoding and
        # re-encoding them (it is a process-wide setting; nothing else here sends datasets).
        _config.STORE_SEND_CHUNKED_DATASET = True
        n = min(self.parallel, max(1, len(files) // 4))
        chunks = [list(files[i::n]) for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            for future in [pool.submit(self._send, chunk) for chunk in chunks]:
                future.result()  # the first SendError of any association is raised

    def _send(self, files: Sequence[Path]) -> None:
        from pydicom.filereader import read_file_meta_info
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        metas = [read_file_meta_info(f) for f in files]
        # The files go as they are (no decoding): each SOP class in the syntax it is stored in.
        for sop_class, syntax in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
            ae.add_requested_context(sop_class, [syntax])
        tls_args = (self.tls, self.node.host) if self.tls is not None else None
        assoc = ae.associate(
            self.node.host,
            self.node.port,
            ae_title=self.node.ae_title,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)],
        )
        if not assoc.is_established:
            raise SendError(f"no association with {self.describe()}")
        try:
            for f in files:
                status = assoc.send_c_store(f)
                code = getattr(status, "Status", None)
                if code is None:
                    raise SendError(f"{self.describe()} did not answer the C-STORE")
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise SendError(f"{self.describe()} refused the C-STORE (status 0x{code:04X})")
        finally:
            assoc.release()


def session_from_env(var: str | None) -> Any:
    """A requests session with the credentials in `$var`: `user:password` for basic auth,
    anything else as a bearer token. The value is never logged or echoed."""
    import requests

    session = requests.Session()
    if var:
        value = os.environ.get(var)
        if not value:
            raise ChestXrayError(f"--auth-env {var}: the environment variable is not set or empty")
        if ":" in value:
            user, _, password = value.partition(":")
            session.auth = (user, password)
        else:
            session.headers["Authorization"] = f"Bearer {value}"
    return session


def dicomweb_client(url: str, auth_env: str | None = None) -> Any:
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=url.rstrip("/"), session=session_from_env(auth_env))


class StowSender:
    """STOW-RS to a DICOMweb server (into the results' own study)."""

    def __init__(self, url: str, auth_env: str | None = None) -> None:
        self.url = url
        self.client = dicomweb_client(url, auth_env)

    def describe(self) -> str:
        return self.url.split("?")[0]

    def send(self, files: Sequence[Path]) -> None:
        import pydicom

        self.store([pydicom.dcmread(f) for f in files])

    def store(self, datasets: Sequence[Any]) -> None:
        """STOW-RS these pydicom Datasets, or raise SendError."""
        import requests

        try:
            response = self.client.store_instances(list(datasets))
        except (requests.RequestException, OSError) as exc:
            raise SendError(f"STOW-RS to {self.describe()} failed ({type(exc).__name__})") from None
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            raise SendError(f"STOW-RS to {self.describe()}: {len(failed)} instance(s) refused")
