"""E-mail notices over SMTP (aiosmtplib): multipart plain text + HTML, filterable headers.

Failures are classified for the outbox (``DeliveryError.permanent``):

- **permanent** (retrying the same message cannot help): a 5xx reply to the recipient (unknown
  mailbox, 550) or to the message data (content refused), an address that does not parse.
- **temporary** (retry with backoff): connection refused or reset, timeouts, any 4xx reply
  (greylisting, 451 local error, 452 mailbox full), and TLS failures. TLS failures are temporary
  on purpose: an expired or replaced certificate, a half-configured STARTTLS or a middlebox are
  conditions of the mail server that its admin fixes, not properties of this notice or this
  recipient; calling them permanent would let a stop go ahead without the user ever being told.
  Authentication failures (530/534/535) are temporary for the same reason (the reaper's own
  credentials are wrong: every notice would fail until an admin fixes them). The outbox's attempt
  limit still ends the retries.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses, make_msgid, parseaddr
from typing import Any, Literal

import aiosmtplib

from .outbox import DeliveryError
from .render import RenderedNotice

log = logging.getLogger("reaper.notify.email")

Security = Literal["none", "starttls", "tls"]

# Sender-side replies: the reaper's own configuration is wrong, not the notice.
_AUTH_CODES = {530, 534, 535, 538}


def valid_address(addr: str) -> bool:
    """A single plain address ``local@domain`` (no display name, no spaces, one ``@``)."""
    if not addr or any(c in addr for c in " \t\r\n<>,;\"()"):
        return False
    name, parsed = parseaddr(addr)
    if name or parsed != addr or parsed.count("@") != 1:
        return False
    local, domain = parsed.split("@")
    return bool(local) and bool(domain) and "." in domain and not domain.startswith(".") and ".." not in domain


def resolve_address(
    username: str,
    *,
    template: str = "{username}@example.org",
    mapping: Mapping[str, str] | None = None,
    auth_state: Mapping[str, Any] | None = None,
    auth_state_key: str = "email",
) -> str | None:
    """The e-mail address of a hub user: the mapping first, then ``auth_state[key]``, then the template.

    Each source is used only if it gives a valid address; an invalid one falls through to the next
    (and is logged). Returns None when no source gives a valid address (or the template is empty).
    """
    candidates: list[tuple[str, Any]] = []
    if mapping and username in mapping:
        candidates.append(("mapping", mapping[username]))
    if auth_state and auth_state_key and auth_state.get(auth_state_key):
        candidates.append((f"auth_state[{auth_state_key!r}]", auth_state.get(auth_state_key)))
    if template:
        try:
            candidates.append(("template", template.format(username=username)))
        except (KeyError, IndexError, ValueError) as e:
            log.error("email address template %r is broken: %s", template, e)
    for source, value in candidates:
        if isinstance(value, str) and valid_address(value.strip()):
            return value.strip()
        log.warning("email address for %s from %s is not valid: %r", username, source, value)
    return None


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _list_id(value: str) -> str:
    v = value.strip()
    return v if "<" in v else f"<{v}>"


class EmailSender:
    """Sends rendered notices by SMTP. One connection per message (notices are few)."""

    name = "email"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        security: Security = "starttls",
        username: str | None = None,
        password: str | None = None,
        from_addr: str,
        reply_to: str | None = None,
        list_id: str = "<reaper.hub.example>",
        timeout: float = 30,
        validate_certs: bool = True,
        cert_bundle: str | None = None,
    ) -> None:
        if security not in ("none", "starttls", "tls"):
            raise ValueError(f"security must be none, starttls or tls, not {security!r}")
        if not getaddresses([from_addr]) or not valid_address(getaddresses([from_addr])[0][1]):
            raise ValueError(f"from_addr is not a valid address: {from_addr!r}")
        self.host = host
        self.port = port
        self.security = security
        self.username = username
        self._password = password
        self.from_addr = from_addr
        self.reply_to = reply_to
        self.list_id = _list_id(list_id)
        self.timeout = timeout
        self.validate_certs = validate_certs
        self.cert_bundle = cert_bundle

    def __repr__(self) -> str:  # never show the password
        return (f"EmailSender({self.host}:{self.port}, security={self.security}, "
                f"user={self.username!r}, from={self.from_addr!r})")

    def build_message(
        self,
        to: list[str],
        rendered: RenderedNotice,
        *,
        cc: list[str] | None = None,
        headers: Mapping[str, str] | None = None,
        now: datetime | None = None,
    ) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.from_addr
        msg["To"] = ", ".join(to)
        if cc:
            msg["Cc"] = ", ".join(cc)
        if self.reply_to:
            msg["Reply-To"] = self.reply_to
        msg["Subject"] = " ".join(rendered.subject.split())
        msg["Date"] = format_datetime(now or datetime.now(UTC))
        domain = getaddresses([self.from_addr])[0][1].rpartition("@")[2] or None
        msg["Message-ID"] = make_msgid("reaper", domain=domain)
        msg["List-Id"] = f"JupyterHub reaper notices {self.list_id}"
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Auto-Response-Suppress"] = "All"  # no out-of-office replies to a robot
        msg["X-Reaper-Notice"] = rendered.kind
        for k, v in (headers or {}).items():
            if "\n" in k or "\r" in k or "\n" in str(v) or "\r" in str(v):
                raise ValueError(f"header {k!r} contains a line break")
            if k in msg:
                msg.replace_header(k, str(v))
            else:
                msg[k] = str(v)
        msg.set_content(rendered.text)
        msg.add_alternative(rendered.html, subtype="html")
        return msg

    async def send(
        self,
        to: str | list[str],
        rendered: RenderedNotice,
        *,
        cc: str | list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Send one notice; returns its Message-ID. Raises DeliveryError (see the module doc)."""
        to_list = [a.strip() for a in _as_list(to)]
        cc_list = [a.strip() for a in _as_list(cc)]
        bad = [a for a in to_list + cc_list if not valid_address(a)]
        if bad or not to_list:
            raise DeliveryError(f"invalid recipient address {bad or to_list!r}", permanent=True)
        msg = self.build_message(to_list, rendered, cc=cc_list, headers=headers)
        msgid = str(msg["Message-ID"])
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self.username or None,
            password=self._password if self.username else None,
            use_tls=self.security == "tls",
            start_tls=True if self.security == "starttls" else False,
            timeout=self.timeout,
            validate_certs=self.validate_certs,
            cert_bundle=self.cert_bundle,
        )
        where = f"{self.host}:{self.port}"
        try:
            async with smtp:
                errors, _response = await smtp.send_message(msg)
        except aiosmtplib.SMTPRecipientsRefused as e:
            codes = [r.code for r in e.recipients]
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in e.recipients)
            permanent = all(500 <= c < 600 for c in codes)
            raise DeliveryError(f"{where} refused the recipients: {detail}", permanent=permanent) from None
        except aiosmtplib.SMTPResponseException as e:
            permanent = 500 <= e.code < 600 and e.code not in _AUTH_CODES and not isinstance(
                e, aiosmtplib.SMTPAuthenticationError
            )
            kind = type(e).__name__
            raise DeliveryError(f"{where} answered {e.code} {e.message} ({kind})", permanent=permanent) from None
        except aiosmtplib.SMTPNotSupported as e:
            raise DeliveryError(f"{where}: {e} (check notify.email.security)", permanent=False) from None
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError) as e:
            raise DeliveryError(f"{where}: {type(e).__name__}: {e}", permanent=False) from None
        refused_to = {a: r for a, r in errors.items() if a in to_list}
        if refused_to:
            # The server took the message for some recipients (the admin copy) but not the user.
            detail = "; ".join(f"{a}: {r.code} {r.message}" for a, r in refused_to.items())
            permanent = all(500 <= r.code < 600 for r in refused_to.values())
            raise DeliveryError(f"{where} refused {detail}", permanent=permanent)
        if errors:
            log.warning("notice %s: copy refused for %s", rendered.kind, ", ".join(errors))
        log.info("notice %s sent by email to %s (%s)", rendered.kind, ", ".join(to_list), msgid)
        return msgid


__all__ = ["EmailSender", "resolve_address", "valid_address", "DeliveryError"]
