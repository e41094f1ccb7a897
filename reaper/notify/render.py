"""Render notices from Jinja2 templates: one template per notice kind and channel.

Templates ship in ``reaper/notify/templates``; an admin can override any of them by putting a file
with the same name in a directory (``notify.templates`` in config.yaml). The admin directory is
searched first, the package second, so a site can override one file and keep the rest.

Files, for each kind in :class:`reaper.core.model.NoticeKind` (warning, reminder, final, stopped,
walltime, orphan):

=========================  =====================================================================
``<kind>.subject.txt``     the e-mail subject (one line; newlines are folded into spaces)
``<kind>.txt``             the plain-text e-mail body
``<kind>.html``            the HTML e-mail body (autoescaped: every variable is HTML-escaped)
``<kind>.slack.txt``       the Slack message text, in Slack *mrkdwn* (every variable is escaped
                           for mrkdwn: ``&``, ``<``, ``>``); it is also the notification fallback
=========================  =====================================================================

Shared pieces: ``_layout.html`` (the HTML frame every ``<kind>.html`` extends), ``_where.txt`` and
``_where.html`` (the "where it runs" lines of the details), ``_actions.txt`` and
``_actions.slack.txt`` (how to stop it now / keep it: the last answers of the first lines) and
``_footer.txt`` (why you get this message). The Slack blocks are built in Python (see
:func:`slack_blocks`) around the rendered ``<kind>.slack.txt``: a section with the text, a context
line, and link buttons "Keep running for 2h" (the signed one-click link) / "Open my server" /
"Control panel". Building the structure
in Python keeps it valid Block Kit whatever a site puts in its text.

Every template is rendered with ``StrictUndefined``: a template that uses a variable that is not
documented in :class:`TemplateContext` fails, and :func:`check_templates` reports it with the file name.

Filters available in every template:

- ``localtime``: an aware datetime shown in the hub time zone, ``"14:00 EST, Tue 25 Nov"``.
- ``relative``: an aware datetime relative to ``now``, ``"in 42 min"``, ``"3h10m ago"``.
- ``options``: a dict (``user_options``) as ``"key: value, key: value"``, shortened.
"""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2

from reaper.core.model import NoticeKind
from reaper.store.context import NoticeContext
from reaper.units import format_memory, humanize, local_datetime, parse_iso, read_user_options
from reaper.units import relative as format_relative

PACKAGE_TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")

# The files of one kind, by channel.
CHANNEL_FILES = {
    "subject": "{kind}.subject.txt",
    "text": "{kind}.txt",
    "html": "{kind}.html",
    "slack": "{kind}.slack.txt",
}
SHARED_FILES = ("_layout.html", "_where.txt", "_where.html", "_actions.txt", "_actions.slack.txt", "_footer.txt")


@dataclass(frozen=True)
class TemplateContext:
    """Everything a notice template may use. Templates see each field as a variable of the same name.

    ====================  =====================================================================
    variable              meaning
    ====================  =====================================================================
    ``username``          the hub user name (``alice``)
    ``server_name``       the named server, ``""`` for the default server
    ``server_label``      how we name the server, after "your": ``server``, ``server "gpu1"``, or with
                          the hub's display name ``server "gpu1" (My GPU box)``
    ``display_name``      the hub's display_name of the server (JupyterHub 5+), or None
    ``hub_name``          the hub's name as people know it (``Mila JupyterHub``)
    ``hub_url``           the hub's public address (``https://hub.example.org/hub/``)
    ``server_url``        the server's own address: open it again to keep it running
    ``control_panel_url`` the hub's Control Panel (``/hub/home``): Stop My Server is there
    ``keep_url``          the one-click "keep running" link: a signed link to the confirm page on the
                          reaper's service (``/services/reaper/keep-link?t=...``), or None
    ``keep_for``          how long one click keeps it running (``2h``, within ``web.keep``)
    ``page_url``          the reaper's page, this server's card (all your servers, why, longer keeps)
    ``state``             what we saw: ``detached`` (window closed), ``attached``, ``computing``
    ``idle_since``        aware datetime: when the idle spell started (show with ``|localtime``)
    ``idle_for``          how long it has been idle, human (``3h10m``)
    ``reason``            the policy's sentence ("window closed 3h10m ago; stop at 14:00 ...")
    ``detail``            what the probe saw ("no browser connected since 13:05, kernels idle")
    ``stop_at``           aware datetime of the stop if nothing changes, or None
    ``tz``                the hub's time zone name (``America/Toronto``); ``|localtime`` uses it
    ``now``               aware datetime the notice was made at; ``|relative`` counts from it
    ``job_id``            the batch (Slurm) job id, or None
    ``partition``         the Slurm partition, or None
    ``node``              the node the job runs on, or None
    ``gpus``              GPUs held (``1``, ``"a100:2"``), or None
    ``cpus``              CPUs held, or None
    ``mem``               memory held, human (``16 GB``), or None
    ``walltime_end``      aware datetime the job's walltime ends, or None
    ``notice_number``     1 for the first warning, 2 for the first reminder, ...
    ``reclaimed``         for ``stopped``: what was freed, ``"4 CPUs, 1 GPU, 16 GB for 5h20m"``
    ``stopped_at``        for ``stopped``: aware datetime the reaper stopped it, or None
    ``admin_contact``     who to write to (``support@example.org``), or ``""``
    ``user_options``      the options chosen at spawn (dict; show with ``|options``)
    ====================  =====================================================================

    Derived for the templates (set by :func:`render`, not fields):

    ====================  =====================================================================
    ``kind``              the notice kind being rendered (``warning``, ``final`` ...)
    ``where``             ``Slurm job 4242 on node cn-a001, partition main``, or ``""``
    ``resources``         ``4 CPUs, 1 GPU, 16 GB``, or ``""`` when nothing is known
    ``holds``             ``resources``, or words for "not known" (never empty)
    ``why``               ``detail`` when set, else a sentence for ``state``
    ``because``           the short why of the first lines: the policy's reason up to its first
                          ``;`` ("window closed, no activity for 3h13m"), else a sentence for ``state``
    ====================  =====================================================================

    Every ``<kind>`` template answers in its first 8 lines (see :func:`notice_lines` for what a
    line is in HTML and Slack): what (your server X on HUB), why, when (stop at 14:00, in 42 min),
    what it holds (CPUs, GPUs, memory), how to stop it now, how to keep it. Details come after.
    """

    username: str
    server_name: str = ""
    server_label: str = ""
    hub_name: str = "JupyterHub"
    hub_url: str = ""
    server_url: str = ""
    control_panel_url: str = ""
    keep_url: str | None = None
    keep_for: str = "2h"
    page_url: str = ""
    display_name: str | None = None
    state: str = "detached"
    idle_since: datetime | None = None
    idle_for: str = ""
    reason: str = ""
    detail: str = ""
    stop_at: datetime | None = None
    tz: str = "UTC"
    now: datetime | None = None
    job_id: str | None = None
    partition: str | None = None
    node: str | None = None
    gpus: int | str | None = None
    cpus: int | None = None
    mem: str | None = None
    walltime_end: datetime | None = None
    notice_number: int = 1
    reclaimed: str | None = None
    stopped_at: datetime | None = None
    admin_contact: str = ""
    user_options: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        if self.server_label:
            return self.server_label
        shown = (self.display_name or "").strip()
        if shown and shown != self.server_name:
            return f'server "{self.server_name}" ({shown})' if self.server_name else f'server "{shown}"'
        return f'server "{self.server_name}"' if self.server_name else "server"

    def where(self) -> str:
        parts = []
        if self.job_id:
            parts.append(f"Slurm job {self.job_id}")
        if self.node:
            parts.append(f"on node {self.node}")
        text = " ".join(parts)
        if self.partition:
            text = f"{text}, partition {self.partition}" if text else f"partition {self.partition}"
        return text

    def resources(self) -> str:
        parts = []
        if self.cpus:
            parts.append(_plural(self.cpus, "CPU"))
        if self.gpus:
            parts.append(_plural(self.gpus, "GPU"))
        if self.mem:
            parts.append(str(self.mem))
        return ", ".join(parts)

    def variables(self, kind: str) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["server_label"] = self.label()
        out["kind"] = kind
        out["where"] = self.where()
        out["resources"] = self.resources()
        out["holds"] = out["resources"] or "its CPUs and memory (how much is not known here)"
        out["why"] = self.detail or _STATE_TEXT.get(self.state, self.state)
        first = self.reason.split(";", 1)[0].strip()
        out["because"] = first or _STATE_TEXT.get(self.state, self.state)
        if out["now"] is None:
            out["now"] = datetime.now(UTC)
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (datetimes as ISO 8601), for storing the context with the notice."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.isoformat() if isinstance(v, datetime) else v
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TemplateContext:
        """The inverse of :meth:`to_json`; unknown keys are ignored, missing ones take defaults."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            v = data[f.name]
            if f.name in _DATETIME_FIELDS and isinstance(v, str):
                v = parse_iso(v)
            kwargs[f.name] = v
        return cls(**kwargs)


def _plural(n: int | str, unit: str) -> str:
    if isinstance(n, int) or (isinstance(n, str) and n.isdigit()):
        return f"{n} {unit}" + ("" if int(n) == 1 else "s")
    return f"{unit} {n}"  # "GPU a100:2"


_STATE_TEXT = {
    "detached": "the browser window is closed and no kernel is busy",
    "attached": "a browser tab is open but nothing has run in it",
    "computing": "a kernel is busy",
    "unreachable": "the server does not answer",
}

_DATETIME_FIELDS = {"idle_since", "stop_at", "now", "walltime_end", "stopped_at"}


@dataclass(frozen=True)
class RenderedNotice:
    kind: str
    subject: str
    text: str
    html: str
    slack_text: str
    slack_blocks: list[dict[str, Any]]


def context_from(
    notice: NoticeContext,
    *,
    public_url: str,
    tz: str,
    now: datetime,
    hub_name: str = "JupyterHub",
    keep_url: str | None = None,
    keep_for: str = "2h",
    page_url: str = "",
    admin_contact: str = "",
    notice_number: int = 1,
) -> TemplateContext:
    """The template context of a stored notice (pure: no I/O, no clock): its facts as recorded,
    the site's links and names, times relative to ``now`` (the moment it is sent).

    ``public_url`` is the hub's public base (``https://hub.example.org``, without ``/hub``). Where
    it runs comes from the spawner state (``job_id``; ``job_status`` "RUNNING node") and the
    spawn options, read by :func:`reaper.units.read_user_options` (our spawner's, batchspawner's and
    slurmformspawner's names), when present. What it holds comes from the batch job as the sweep
    saw it (``notice.held``: cpus, mem_mb, gpus), each missing one from the spawn options.
    """
    base = public_url.rstrip("/")
    path = notice.url or (f"/user/{notice.user}/{notice.server}/" if notice.server else f"/user/{notice.user}/")
    opts = notice.user_options
    state = notice.spawner_state
    node = state.get("node") or state.get("exechost")
    status = str(state.get("job_status") or "")
    if not node and status.startswith("RUNNING") and len(status.split()) > 1:
        node = status.split()[1]
    idle_since = notice.idle_since
    asked = read_user_options(opts)
    held = notice.held or {}
    gpus: int | str | None = (f"{asked.gpu_type}:{asked.gpus}" if asked.gpu_type else asked.gpus) if asked.gpus else None
    if held.get("gpus"):
        gpus = f"{asked.gpu_type}:{held['gpus']}" if asked.gpu_type else int(held["gpus"])
    return TemplateContext(
        username=notice.user,
        server_name=notice.server,
        hub_name=hub_name,
        hub_url=f"{base}/hub/",
        server_url=f"{base}{path}",
        control_panel_url=f"{base}/hub/home",
        keep_url=keep_url,
        keep_for=keep_for,
        page_url=page_url,
        display_name=notice.display_name,
        state=notice.state,
        idle_since=idle_since,
        idle_for=humanize(now - idle_since) if idle_since else "",
        reason=notice.reason,
        detail=notice.detail,
        stop_at=notice.stop_at,
        tz=tz,
        now=now,
        job_id=notice.job_id,
        partition=asked.partition,
        node=str(node) if node else None,
        gpus=gpus,
        cpus=int(held["cpus"]) if held.get("cpus") else asked.cpus,
        mem=format_memory(held.get("mem_mb") or asked.mem_mb) or None,
        walltime_end=notice.job_end,
        notice_number=notice_number,
        reclaimed=notice.reclaimed,
        stopped_at=notice.stopped_at,
        admin_contact=admin_contact,
        user_options=dict(opts),
    )


# --- filters -----------------------------------------------------------------------------------


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def format_localtime(value: datetime | None, tz: str, *, with_date: bool = True) -> str:
    """``14:00 EST, Tue 25 Nov`` in the zone named ``tz`` (:func:`reaper.units.local_datetime`)."""
    return local_datetime(value, _zone(tz), with_date=with_date)


def format_options(value: Any, limit: int = 300) -> str:
    if not value:
        return ""
    if isinstance(value, dict):
        text = ", ".join(f"{k}: {v}" for k, v in value.items())
    else:
        text = str(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def mrkdwn_escape(value: Any) -> str:
    """Escape a value for Slack mrkdwn: ``&``, ``<`` and ``>`` are the only control characters."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- environments ------------------------------------------------------------------------------


def _loader(template_dir: str | None) -> jinja2.BaseLoader:
    loaders: list[jinja2.BaseLoader] = []
    if template_dir:
        loaders.append(jinja2.FileSystemLoader(template_dir))
    loaders.append(jinja2.FileSystemLoader(PACKAGE_TEMPLATES))
    return jinja2.ChoiceLoader(loaders)


class _SlackMarkup(str):
    """A string already escaped for mrkdwn (output of a filter that built a Slack link)."""


def _slack_finalize(value: Any) -> Any:
    if isinstance(value, _SlackMarkup):
        return str(value)
    return mrkdwn_escape(value)


def _environment(template_dir: str | None, mode: str) -> jinja2.Environment:
    if mode == "html":
        env = jinja2.Environment(
            loader=_loader(template_dir), undefined=jinja2.StrictUndefined, autoescape=True,
            keep_trailing_newline=True,
        )
    elif mode == "slack":
        env = jinja2.Environment(
            loader=_loader(template_dir), undefined=jinja2.StrictUndefined, autoescape=False,
            finalize=_slack_finalize, keep_trailing_newline=True,
        )
    else:
        env = jinja2.Environment(
            loader=_loader(template_dir), undefined=jinja2.StrictUndefined, autoescape=False,
            keep_trailing_newline=True,
        )
    env.trim_blocks = True
    env.lstrip_blocks = True

    def localtime(ctx: jinja2.runtime.Context, value: datetime | None, with_date: bool = True) -> str:
        return format_localtime(value, ctx.get("tz", "UTC"), with_date=with_date)

    def relative(ctx: jinja2.runtime.Context, value: datetime | None) -> str:
        now = ctx.get("now") or datetime.now(UTC)
        return format_relative(value, now)

    def slack_link(url: Any, label: Any) -> str:
        # <url|label>: both escaped; the result must not be escaped again by finalize.
        return _SlackMarkup(f"<{mrkdwn_escape(url)}|{mrkdwn_escape(label)}>")

    env.filters["localtime"] = jinja2.pass_context(localtime)
    env.filters["relative"] = jinja2.pass_context(relative)
    env.filters["options"] = format_options
    env.filters["slack_link"] = slack_link
    return env


class Renderer:
    """Renders notices; keeps its Jinja environments (and their template cache)."""

    def __init__(self, template_dir: str | None = None) -> None:
        self.template_dir = template_dir
        self._envs = {m: _environment(template_dir, m) for m in ("text", "html", "slack")}

    def _render(self, mode: str, name: str, variables: dict[str, Any]) -> str:
        return self._envs[mode].get_template(name).render(variables)

    def render(self, kind: NoticeKind | str, context: TemplateContext) -> RenderedNotice:
        k = NoticeKind(kind).value
        v = context.variables(k)
        subject = " ".join(self._render("text", CHANNEL_FILES["subject"].format(kind=k), v).split())
        text = self._render("text", CHANNEL_FILES["text"].format(kind=k), v)
        html = self._render("html", CHANNEL_FILES["html"].format(kind=k), v)
        slack_text = self._render("slack", CHANNEL_FILES["slack"].format(kind=k), v).strip()
        return RenderedNotice(
            kind=k, subject=subject, text=_tidy(text), html=html, slack_text=slack_text,
            slack_blocks=slack_blocks(k, context, slack_text),
        )


def _tidy(text: str) -> str:
    """At most one blank line in a row, a single final newline."""
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


_renderers: dict[str | None, Renderer] = {}


def render(kind: NoticeKind | str, context: TemplateContext, *, template_dir: str | None = None) -> RenderedNotice:
    """Render one notice for every channel. Raises jinja2 errors on a broken template."""
    r = _renderers.get(template_dir)
    if r is None:
        r = _renderers[template_dir] = Renderer(template_dir)
    return r.render(kind, context)


# --- Slack blocks --------------------------------------------------------------------------------

SLACK_SECTION_LIMIT = 3000  # characters in one section's text
BUTTON_TEXT_LIMIT = 75


def slack_blocks(kind: str, context: TemplateContext, text: str) -> list[dict[str, Any]]:
    """Block Kit for one notice: the text as mrkdwn sections, a context line, link buttons."""
    blocks: list[dict[str, Any]] = []
    chunk = text
    while chunk:
        part, chunk = chunk[:SLACK_SECTION_LIMIT], chunk[SLACK_SECTION_LIMIT:]
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": part}})
    where = [f"{context.hub_name}"]
    if context.job_id:
        where.append(f"job {context.job_id}")
    if context.node:
        where.append(f"on {context.node}")
    blocks.append({
        "type": "context",
        "elements": [{"type": "mrkdwn", "text": mrkdwn_escape(" · ".join(where))[:2000]}],
    })
    buttons: list[dict[str, Any]] = []

    def button(label: str, url: str | None, action_id: str, style: str | None = None) -> None:
        if not url or not url.startswith(("http://", "https://")):
            return
        b: dict[str, Any] = {
            "type": "button",
            "text": {"type": "plain_text", "text": label[:BUTTON_TEXT_LIMIT]},
            "url": url,
            "action_id": action_id,
        }
        if style:
            b["style"] = style
        buttons.append(b)

    if kind == NoticeKind.STOPPED.value:
        button("Start it again", context.control_panel_url, "reaper-control-panel", "primary")
    elif kind != NoticeKind.ORPHAN.value:
        if kind != NoticeKind.WALLTIME.value:  # a time limit cannot be extended
            button(f"Keep running for {context.keep_for}", context.keep_url, "reaper-keep", "primary")
        button("Open my server", context.server_url, "reaper-open")
        button("Control panel", context.control_panel_url, "reaper-control-panel")
    if buttons:
        blocks.append({"type": "actions", "elements": buttons})
    return blocks


# --- what a reader sees first -----------------------------------------------------------------

FIRST_LINES = 8  # every notice answers its six questions in this many lines


class _HTMLLines(HTMLParser):
    """The text of an HTML body as a reader sees it: one line per block element (``p``, ``h1``-``h6``,
    ``div``, ``li``, ``tr``, ``br``, ...), a link written as ``text <href>`` (as a text-mode mail
    reader shows it), ``<head>`` (the title) left out."""

    BLOCKS = frozenset({"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "br", "table", "hr",
                        "ul", "ol", "section", "header", "footer", "blockquote", "body"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.current: list[str] = []
        self.skip = 0
        self.href: list[str | None] = []

    def _break(self) -> None:
        line = " ".join("".join(self.current).split())
        if line:
            self.lines.append(line)
        self.current = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("head", "style", "script"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self._break()
        elif tag == "a":
            self.href.append(dict(attrs).get("href"))
        elif tag == "td":
            self.current.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("head", "style", "script"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self._break()
        elif tag == "a" and self.href:
            href = self.href.pop()
            if href:
                self.current.append(f" <{href}>")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.current.append(data)


def notice_lines(rendered: RenderedNotice, channel: str) -> list[str]:
    """The non-blank lines of one rendered notice as its reader sees them, in order. What a
    "line" is, by channel:

    - ``text``: a line of the plain-text body.
    - ``html``: a rendered text line of the body: one per block element, links as ``text <href>``
      (see :class:`_HTMLLines`); the ``<title>`` is not a line.
    - ``slack``: a line of the message's mrkdwn text (the first section block's text, which is
      also the notification fallback), then one line per button of the actions block, written
      ``[label] <url>``.

    The first :data:`FIRST_LINES` of these carry the notice's six answers (tests/adapters/test_render.py).
    """
    if channel == "text":
        return [ln for ln in rendered.text.splitlines() if ln.strip()]
    if channel == "html":
        p = _HTMLLines()
        p.feed(rendered.html)
        p.close()
        p._break()
        return p.lines
    if channel == "slack":
        lines: list[str] = []
        for b in rendered.slack_blocks:
            if b["type"] == "section":
                lines += [ln for ln in b["text"]["text"].splitlines() if ln.strip()]
            elif b["type"] == "actions":
                lines += [f"[{e['text']['text']}] <{e.get('url', '')}>" for e in b["elements"]]
        return lines
    raise ValueError(f"no such channel: {channel!r} (text, html, slack)")


# --- checking a template directory ----------------------------------------------------------------


def sample_context(now: datetime | None = None) -> TemplateContext:
    """A realistic context with every field set: used by check_templates and `notify preview`."""
    now = now or datetime(2026, 11, 25, 18, 18, tzinfo=UTC)
    hub = "https://hub.example.org"
    return TemplateContext(
        username="alice",
        server_name="gpu1",
        server_label='server "gpu1"',
        hub_name="Example JupyterHub",
        hub_url=f"{hub}/hub/",
        server_url=f"{hub}/user/alice/gpu1/",
        control_panel_url=f"{hub}/hub/home",
        keep_url=f"{hub}/services/reaper/keep-link?t=SAMPLE.TOKEN",
        keep_for="2h",
        page_url=f"{hub}/services/reaper/#server-alice-gpu1",
        display_name=None,
        state="detached",
        idle_since=now - timedelta(hours=3, minutes=13),
        idle_for="3h13m",
        reason="window closed 3h13m ago; stop at 14:00 after the final notice at 13:18",
        detail="no browser connected since 10:05, kernels idle",
        stop_at=now + timedelta(minutes=42),
        tz="America/Toronto",
        now=now,
        job_id="4242",
        partition="main",
        node="cn-a001",
        gpus=1,
        cpus=4,
        mem="16 GB",
        walltime_end=now + timedelta(hours=20),
        notice_number=2,
        reclaimed="4 CPUs, 1 GPU, 16 GB for 5h20m",
        stopped_at=now,
        admin_contact="support@example.org",
        user_options={"partition": "main", "gpus": "1"},
    )


def _template_file(exc: BaseException, fallback: str) -> str:
    """The template file a rendering error happened in (Jinja puts it in the traceback)."""
    if isinstance(exc, jinja2.TemplateSyntaxError):
        name = exc.filename or exc.name or fallback
        return f"{name}:{exc.lineno}"
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        fn = frame.filename or ""
        if fn.endswith((".txt", ".html")) and ("templates" in fn or os.path.exists(fn)):
            found = f"{fn}:{frame.lineno}"
    return found or fallback


def check_templates(template_dir: str | None) -> list[str]:
    """Render every kind on every channel with :func:`sample_context`; return the problems found.

    An empty list means the templates are usable. Problems name the file (and line when known):
    a syntax error, a variable that is not in :class:`TemplateContext` (StrictUndefined), a file in
    the override directory that matches no template name (a typo would otherwise be ignored).
    """
    problems: list[str] = []
    if template_dir:
        if not os.path.isdir(template_dir):
            return [f"{template_dir}: not a directory"]
        known = set(SHARED_FILES) | {
            pattern.format(kind=k.value) for k in NoticeKind for pattern in CHANNEL_FILES.values()
        }
        for name in sorted(os.listdir(template_dir)):
            path = os.path.join(template_dir, name)
            if os.path.isfile(path) and name not in known and not name.startswith("."):
                problems.append(f"{path}: not a template name the reaper uses (known: <kind>.subject.txt, "
                                f"<kind>.txt, <kind>.html, <kind>.slack.txt, {', '.join(SHARED_FILES)})")
    renderer = Renderer(template_dir)
    for ctx_variant in (sample_context(), _sparse_context()):
        for k in NoticeKind:
            for channel, pattern in CHANNEL_FILES.items():
                name = pattern.format(kind=k.value)
                mode = {"subject": "text", "text": "text", "html": "html", "slack": "slack"}[channel]
                try:
                    renderer._render(mode, name, ctx_variant.variables(k.value))
                except jinja2.TemplateNotFound as e:
                    problems.append(f"{name}: template not found ({e.name})")
                except jinja2.TemplateError as e:
                    where = _template_file(e, _resolved_path(template_dir, name))
                    msg = f"{where}: {type(e).__name__}: {e.message or e}"
                    if msg not in problems:
                        problems.append(msg)
                except Exception as e:  # a filter fed the wrong type, for example
                    where = _template_file(e, _resolved_path(template_dir, name))
                    msg = f"{where}: {type(e).__name__}: {e}"
                    if msg not in problems:
                        problems.append(msg)
    return problems


def _sparse_context() -> TemplateContext:
    """The same sample with every optional field empty: templates must cope with unknowns."""
    base = sample_context()
    return TemplateContext(
        username=base.username, hub_name=base.hub_name, hub_url=base.hub_url, server_url=base.server_url,
        control_panel_url=base.control_panel_url, idle_since=None, stop_at=None, tz="UTC", now=base.now,
        reason=base.reason,
    )


def _resolved_path(template_dir: str | None, name: str) -> str:
    if template_dir and os.path.exists(os.path.join(template_dir, name)):
        return os.path.join(template_dir, name)
    return os.path.join(PACKAGE_TEMPLATES, name)


__all__ = [
    "TemplateContext",
    "RenderedNotice",
    "Renderer",
    "render",
    "check_templates",
    "sample_context",
    "context_from",
    "slack_blocks",
    "notice_lines",
    "FIRST_LINES",
    "format_localtime",
    "format_relative",
    "mrkdwn_escape",
]
