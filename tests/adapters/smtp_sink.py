"""A real SMTP server on loopback for tests (aiosmtpd), that keeps what it receives.

- ``SmtpSink()`` listens on 127.0.0.1 at a free port, plain SMTP.
- ``SmtpSink(tls=TlsFiles, require_starttls=True, users={"reaper": "secret"})`` offers STARTTLS
  with a self-signed certificate (see :func:`make_self_signed`) and requires AUTH after it.
- ``fail_next(code_and_message, stage="rcpt"|"data"|"mail", count=1)`` answers the next commands
  of that stage with an error reply such as ``"451 4.3.0 try later"`` or ``"550 5.1.1 no user"``.
- ``stop()`` / ``start()``: take the server down for a while and bring it back on the same port.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str


def make_self_signed(directory: Path, hostname: str = "localhost") -> TlsFiles:
    """A self-signed certificate for ``hostname`` and 127.0.0.1, made with ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "smtp-cert.pem"
    key_path = directory / "smtp-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return TlsFiles(str(cert_path), str(key_path))


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes
    authenticated_as: str | None = None
    tls: bool = False


@dataclass
class _Handler:
    users: dict[str, str]
    messages: list[Received] = field(default_factory=list)
    failures: dict[str, list[str]] = field(default_factory=lambda: {"mail": [], "rcpt": [], "data": []})
    reject: dict[str, str] = field(default_factory=dict)  # address -> reply, every time
    lock: threading.Lock = field(default_factory=threading.Lock)
    commands: list[str] = field(default_factory=list)

    def _take(self, stage: str) -> str | None:
        with self.lock:
            if self.failures[stage]:
                return self.failures[stage].pop(0)
        return None

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, mail_options: Any) -> str:
        self.commands.append(f"MAIL {address}")
        failure = self._take("mail")
        if failure:
            return failure
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        self.commands.append(f"RCPT {address}")
        if address in self.reject:
            return self.reject[address]
        failure = self._take("rcpt")
        if failure:
            return failure
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.commands.append("DATA")
        failure = self._take("data")
        if failure:
            return failure
        raw = bytes(envelope.original_content or envelope.content)
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        login = session.auth_data if session.authenticated else None
        with self.lock:
            self.messages.append(
                Received(
                    mail_from=envelope.mail_from,
                    rcpt_tos=list(envelope.rcpt_tos),
                    message=msg,
                    raw=raw,
                    authenticated_as=login.decode() if isinstance(login, bytes) else login,
                    tls=session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None,
                )
            )
        return "250 Message accepted for delivery"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode()
        ok = self.users.get(login) == auth_data.password.decode()
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)


class SmtpSink:
    def __init__(
        self,
        *,
        tls: TlsFiles | None = None,
        require_starttls: bool = False,
        users: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.handler = _Handler(users=dict(users or {}))
        self._kwargs: dict[str, Any] = {}
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(tls.cert, tls.key)
            self._kwargs["tls_context"] = ctx
            self._kwargs["require_starttls"] = require_starttls
        if users:
            self._kwargs["authenticator"] = self.handler.authenticate
            self._kwargs["auth_required"] = True
            self._kwargs["auth_require_tls"] = tls is not None
        self._controller: Controller | None = None

    @property
    def messages(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.messages)

    @property
    def commands(self) -> list[str]:
        return list(self.handler.commands)

    def fail_next(self, reply: str, *, stage: str = "rcpt", count: int = 1) -> None:
        with self.handler.lock:
            self.handler.failures[stage].extend([reply] * count)

    def reject_address(self, address: str, reply: str = "550 5.1.1 No such user here") -> None:
        self.handler.reject[address] = reply

    def start(self) -> SmtpSink:
        if self._controller is None:
            # ready_timeout: the controller checks that the server answers before returning.
            self._controller = Controller(
                self.handler, hostname=self.host, port=self.port, ready_timeout=10, **self._kwargs
            )
            self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
