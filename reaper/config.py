"""config.yaml -> validated, typed settings.

Errors name the file, the key path and the line, e.g.::

    config.yaml:23: rules[1].detached.stop_after: stop_after (30m) must be later than warn_after (1h)

Secrets never live in the file: a value ``${NAME}`` is replaced by the environment variable NAME,
and keys that hold secrets (``*password``, ``*token``) refuse literal values.

The pure core never sees these pydantic models: the rules are converted into its frozen types
(``Settings.resolved_rules()``, ``default_rule()`` -> reaper.core.rules; ``keep_policy()`` ->
reaper.core.keep). This module imports no adapter (web, batch, notify, store, hub) except the
notice templates' check, late (tests/unit/test_boundaries.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .core.keep import KeepPolicy
from .core.rules import Match, ResolvedRule, Thresholds

# Re-exported for older imports (reaper.config.parse_duration); new code imports reaper.units.
from .units import format_duration as format_duration
from .units import parse_duration as parse_duration

# --------------------------------------------------------------------------- durations

# config.yaml's durations ("90m", "1h30m", "7d"): reaper.units reads and writes them.
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __repr_args__(self) -> Any:
        # repr()/str() of settings (in a log line, a traceback) never show a secret.
        for name, value in super().__repr_args__():
            if name and re.search(r"(password|token|secret)$", name, re.I) and value:
                yield name, "***"
            else:
                yield name, value


# --------------------------------------------------------------------------- policy
#
# The policy's keys as written, validated here; Settings.resolved_rules() and default_rule()
# convert them into the core's frozen rule types (reaper.core.rules), all the policy sees.


class ThresholdsFields(Strict):
    """When to warn and when to stop, counted from the start of the idle spell."""

    warn_after: Duration | None = None
    stop_after: Duration | None = None

    def core(self) -> Thresholds:
        return Thresholds(warn_after=self.warn_after, stop_after=self.stop_after)


class ThresholdsPatch(Strict):
    warn_after: Duration | None = None
    stop_after: Duration | None = None


Channel = Literal["email", "slack", "log", "lab"]


class PolicyFields(Strict):
    """Every policy key. In `defaults` all are set; in a rule, unset keys inherit from defaults."""

    detached: ThresholdsFields = ThresholdsFields(warn_after=timedelta(hours=1), stop_after=timedelta(hours=3))
    attached: ThresholdsFields = ThresholdsFields(warn_after=timedelta(hours=8), stop_after=timedelta(hours=24))
    computing: Literal["protect", "count"] = "protect"
    working: Literal["protect", "count"] = "protect"  # a program running (a terminal command, a background process)
    max_age: Duration | None = None
    remind_every: Duration = timedelta(hours=1)
    min_notice: Duration = timedelta(minutes=30)
    exempt: bool = False
    channels: list[Channel] = Field(default_factory=lambda: ["log"])


class MatchFields(Strict):
    """A rule matches when every given key matches (keys left out match anything)."""

    users: list[str] | None = None  # names or globs
    groups: list[str] | None = None  # any of these groups
    servers: list[str] | None = None  # server-name globs; "" is the default server
    user_options: dict[str, Any] | None = None  # key -> value or list of accepted values
    min_gpus: int | None = Field(default=None, ge=0)  # the batch job's, else units.read_user_options
    partitions: list[str] | None = None  # the batch job's, else units.read_user_options

    def core(self) -> Match:
        def strs(v: list[str] | None) -> tuple[str, ...] | None:
            return tuple(v) if v is not None else None

        options = None
        if self.user_options is not None:
            options = {k: tuple(v) if isinstance(v, list) else v for k, v in self.user_options.items()}
        return Match(
            users=strs(self.users),
            groups=strs(self.groups),
            servers=strs(self.servers),
            user_options=options,
            min_gpus=self.min_gpus,
            partitions=strs(self.partitions),
        )


class Rule(Strict):
    name: str
    match: MatchFields = MatchFields()
    detached: ThresholdsPatch | None = None
    attached: ThresholdsPatch | None = None
    computing: Literal["protect", "count"] | None = None
    working: Literal["protect", "count"] | None = None
    max_age: Duration | None = None
    remind_every: Duration | None = None
    min_notice: Duration | None = None
    exempt: bool | None = None
    channels: list[Channel] | None = None


def _merge(base: ThresholdsFields, patch: ThresholdsPatch | None) -> Thresholds:
    if patch is None:
        return base.core()
    given = patch.model_fields_set
    return Thresholds(
        warn_after=patch.warn_after if "warn_after" in given else base.warn_after,
        stop_after=patch.stop_after if "stop_after" in given else base.stop_after,
    )


def resolve(defaults: PolicyFields, rule: Rule | None, protect_idle: timedelta = timedelta(hours=2)) -> ResolvedRule:
    if rule is None:
        return ResolvedRule(
            protect_idle=protect_idle,
            name="defaults",
            match=Match(),
            detached=defaults.detached.core(),
            attached=defaults.attached.core(),
            computing=defaults.computing,
            working=defaults.working,
            max_age=defaults.max_age,
            remind_every=defaults.remind_every,
            min_notice=defaults.min_notice,
            exempt=defaults.exempt,
            channels=tuple(defaults.channels),
        )
    given = rule.model_fields_set

    def pick(name: str) -> Any:
        return getattr(rule, name) if name in given else getattr(defaults, name)

    return ResolvedRule(
        protect_idle=protect_idle,
        name=rule.name,
        match=rule.match.core(),
        detached=_merge(defaults.detached, rule.detached),
        attached=_merge(defaults.attached, rule.attached),
        computing=pick("computing"),
        working=pick("working"),
        max_age=pick("max_age"),
        remind_every=pick("remind_every"),
        min_notice=pick("min_notice"),
        exempt=pick("exempt"),
        channels=tuple(pick("channels")),
    )


def check_thresholds(r: ResolvedRule) -> list[tuple[str, str]]:
    """Inconsistencies as (key path inside the rule, message)."""
    errs: list[tuple[str, str]] = []
    for kind in ("detached", "attached"):
        t: Thresholds = getattr(r, kind)
        if t.stop_after is not None and t.stop_after <= timedelta(0):
            errs.append((f"{kind}.stop_after", "stop_after must be longer than 0"))
        if t.warn_after is not None and t.stop_after is not None and t.stop_after <= t.warn_after:
            errs.append(
                (
                    f"{kind}.stop_after",
                    f"stop_after ({format_duration(t.stop_after)}) must be later than "
                    f"warn_after ({format_duration(t.warn_after)})",
                )
            )
        if t.stop_after is not None and r.min_notice > t.stop_after:
            errs.append(
                (
                    f"{kind}.stop_after",
                    f"stop_after ({format_duration(t.stop_after)}) is shorter than "
                    f"min_notice ({format_duration(r.min_notice)}): the final notice could not come in time",
                )
            )
    if r.max_age is not None and r.max_age <= r.min_notice:
        errs.append(("max_age", f"max_age must be longer than min_notice ({format_duration(r.min_notice)})"))
    if r.remind_every <= timedelta(0):
        errs.append(("remind_every", "remind_every must be longer than 0"))
    return errs


# --------------------------------------------------------------------------- the rest


class HubSettings(Strict):
    api_url: str | None = None  # default: $JUPYTERHUB_API_URL (set by the hub for managed services)
    api_token: str | None = None  # default: $JUPYTERHUB_API_TOKEN; if given here, must be ${VAR}
    public_url: str | None = None  # links in notices, and probes via the proxy; default below
    name: str = "JupyterHub"
    timezone: str = "UTC"
    timeout: Duration = timedelta(seconds=10)
    retries: int = Field(default=3, ge=0, le=10)
    concurrency: int = Field(default=4, ge=1, le=64)
    page_size: int = Field(default=200, ge=1, le=200)
    # The HTTP client under httpx for hub calls and probes: aiohttp (a fraction of httpx's own
    # CPU per request, and no quadratic pool scans) or httpx.
    http: Literal["aiohttp", "httpx"] = "aiohttp"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown time zone {v!r} (use an IANA name such as 'America/Montreal')") from e
        return v

    def effective_api_url(self) -> str:
        url = self.api_url or os.environ.get("JUPYTERHUB_API_URL") or "http://127.0.0.1:8081/hub/api"
        return url.rstrip("/")

    def effective_token(self) -> str | None:
        return self.api_token or os.environ.get("JUPYTERHUB_API_TOKEN")

    def effective_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        env = os.environ.get("JUPYTERHUB_PUBLIC_URL") or os.environ.get("JUPYTERHUB_PUBLIC_HUB_URL")
        if env:
            return env.rstrip("/").removesuffix("/hub")
        return "http://127.0.0.1:8000"


class ProbeSettings(Strict):
    via: Literal["direct", "proxy"] = "direct"  # "proxy" counts as activity on the hub: see README
    timeout: Duration = timedelta(seconds=5)
    concurrency: int = Field(default=32, ge=1, le=512)
    skip_fresh: bool = True  # don't probe servers whose hub activity is fresher than every threshold
    reprobe_every: Duration = timedelta(minutes=30)  # ... but probe each at least this often
    # A server detached at its last look is first asked /api/status alone: if its last_activity has
    # not moved since, nothing happened (no kernel message, start, shutdown, terminal or browser
    # request) and /api/kernels is not asked. false: always probe in full.
    confirm_with_status: bool = True
    # Also list terminals (/api/terminals): only adds "1 terminal open" to reasons; their activity
    # is already in /api/status. One more request per probe.
    terminals: bool = False
    # A separate token for probes, holding only access:servers (${VAR}); default: the hub token.
    # Probes go to servers that users control; a narrower token limits what a hostile server learns.
    token: str | None = None
    # /api/status activity younger than this means a tab is open (JupyterLab polls every ~10 s).
    attached_within: Duration = timedelta(seconds=90)
    # A program using at least this share of one core (averaged since the last look) is working:
    # "2%" or 0.02. The batch accounting counts the whole job, the idle server itself included
    # (well under 1 % of a core), so the threshold sits above that.
    working_cpu: Annotated[float, BeforeValidator(parse_cpu_share)] = 0.02
    # Ask the companion extension (GET <server>/api/reaper/activity) what the job runs.
    companion: bool = True

    @field_validator("working_cpu")
    @classmethod
    def _working_cpu(cls, v: float) -> float:
        if not 0 < v <= 1024:
            raise ValueError('working_cpu must be a share of one core above 0, e.g. "2%" or 0.02')
        return v


def parse_cpu_share(v: Any) -> Any:
    """ "2%" -> 0.02; a number is a share of one core as it is (0.02; 1.5 = one and a half cores)."""
    if isinstance(v, bool):
        raise ValueError('working_cpu must be a share of one core, e.g. "2%" or 0.02')
    if isinstance(v, str):
        text = v.strip()
        try:
            return float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f'working_cpu: {v!r} is not a share of one core (e.g. "2%" or 0.02)') from None
    return v


class WorkingSettings(Strict):
    # A terminal command that uses no CPU (a sleep, a hung program) protects its server this long
    # after its last CPU use (or its start), then the server is idle again and the notices name it.
    protect_idle: Duration = timedelta(hours=2)

    @field_validator("protect_idle")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v < timedelta(0):
            raise ValueError("protect_idle must not be negative")
        return v


class SafetySettings(Strict):
    max_stops_per_sweep: int = Field(default=20, ge=0)
    max_stop_fraction: float = Field(default=0.25, ge=0.0, le=1.0)
    fraction_applies_above: int = Field(default=8, ge=0)  # the fraction only counts on hubs with more servers
    stop_concurrency: int = Field(default=32, ge=1, le=256)
    pending_stop_timeout: Duration = timedelta(minutes=5)


class EmailSettings(Strict):
    host: str = "localhost"
    port: int = Field(default=25, ge=1, le=65535)
    security: Literal["none", "starttls", "tls"] = "starttls"  # tls = implicit TLS (port 465)
    username: str | None = None
    password: str | None = None  # "${SMTP_PASSWORD}"
    from_addr: str = "JupyterHub reaper <reaper@localhost>"
    reply_to: str | None = None
    list_id: str = "<reaper.jupyterhub>"  # lets people filter these messages
    timeout: Duration = timedelta(seconds=30)
    validate_certs: bool = True
    cert_bundle: str | None = None
    # Where a user's address comes from, first match wins: address_map (a YAML file of
    # username: address), then the template.
    address_map: str | None = None
    address_template: str = "{username}@example.org"


class SlackSettings(Strict):
    token: str | None = None  # "${SLACK_BOT_TOKEN}" (a bot token with users:read.email, im:write, chat:write)
    base_url: str = "https://slack.com/api/"
    user_map: str | None = None  # YAML file of username: Slack member id (skips the e-mail lookup)
    lookup_ttl: Duration = timedelta(days=7)  # how long an e-mail -> member id lookup is cached
    fallback_to_email: bool = True  # users_not_found: send the notice by e-mail instead


class QuietHours(Strict):
    start: str = "22:00"
    end: str = "07:00"

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", v):
            raise ValueError(f"expected a time such as '22:00', got {v!r}")
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError(
                f"start and end are the same ({self.start}): quiet hours would be empty or the whole day; "
                "leave quiet_hours out to send at any time"
            )
        return self


class NotifySettings(Strict):
    templates: str | None = None  # a folder whose files override the shipped templates
    admin_contact: str = ""  # shown in every notice ("questions: ...")
    admin_cc: list[str] = Field(default_factory=list)  # copied on "we stopped your server" e-mails
    quiet_hours: QuietHours | None = None  # postpone warnings and reminders (never final notices)
    max_notices_per_day: int | None = Field(default=None, ge=1)  # per user, warnings and reminders
    max_attempts: int = Field(default=8, ge=1, le=50)  # per channel, then the delivery failed for good
    retry_base: Duration = timedelta(seconds=30)  # first retry delay, doubled each time (capped at 1h)
    email: EmailSettings | None = None
    slack: SlackSettings | None = None


class SlurmSettings(Strict):
    """The batch guard: what the reaper does to the hub's jobs (the adapter itself is `batch`)."""

    job_name: str = "jupyterhub-reaper"  # must match SlurmSpawner.job_name in the hub config
    cancel_grace: Duration = timedelta(seconds=30)  # after a stop, wait this long for the job to go
    cancel_retries: int = Field(default=3, ge=1, le=20)
    walltime_notice: Duration | None = timedelta(minutes=30)  # tell users before the walltime ends


class OrphanSettings(Strict):
    grace: Duration = timedelta(minutes=10)  # a job no server owns, for this long, is an orphan
    cancel: bool = True  # false: report only


# --------------------------------------------------------------------------- the batch system


BatchSystemName = Literal["auto", "slurm", "pbs", "torque", "none"]
ResolvedSystem = Literal["slurm", "pbs", "torque", "none"]

# The commands of each system (batch.commands); auto and none accept them all.
SYSTEM_COMMANDS: dict[str, tuple[str, ...]] = {
    "slurm": ("squeue", "scancel", "sstat"),
    "pbs": ("qstat", "qdel"),
    "torque": ("qstat", "qdel"),
}

# What needs a batch system, in words (the start log line and check-config say which are off).
JOB_FEATURES = (
    "the job guard after stops",
    "orphan reconciliation",
    "walltime notices",
    "job-aware rules (min_gpus, partitions from the job)",
)


def _system_name(v: Any) -> Any:
    if v is None:
        return "none"  # `system:` left empty has always meant none
    return v.strip().lower() if isinstance(v, str) else v


class BatchCommands(Strict):
    """Command paths (or names on PATH); unset: the command's own name."""

    squeue: str | None = None
    scancel: str | None = None
    sstat: str | None = None  # CPU accounting (cpu_usage)
    qstat: str | None = None
    qdel: str | None = None


class BatchSettings(Strict):
    """The `batch:` section: which batch system, and how to run its commands (reaper/batch)."""

    # auto: slurm when squeue runs (with env below), else pbs when qstat runs, else none
    system: Annotated[BatchSystemName, BeforeValidator(_system_name)] = "auto"
    commands: BatchCommands = BatchCommands()
    prefix: str = ""  # e.g. "sudo -n -u {username}": cancel as the job's user
    env: dict[str, str] = Field(default_factory=dict)  # e.g. {SLURM_CONF: /etc/slurm/slurm.conf}
    timeout: float = Field(default=30.0, gt=0)  # seconds per command
    timezone: str = ""  # the zone the batch system prints times in ("" = local)
    # json (PBS Pro `qstat -f -F json`) | xml (Torque `qstat -x`) | text (classic `qstat -f`) |
    # auto (json, else xml, else text, moving on when qstat refuses the option); null: xml for
    # torque, else json
    pbs_format: Literal["json", "xml", "text", "auto"] | None = None

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, v: Any) -> Any:
        if isinstance(v, dict):  # SLURM_DEBUG: 1 is as good as "1"
            return {k: str(x) if isinstance(x, int | float | bool) else x for k, x in v.items()}
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        if v:
            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError) as e:
                raise ValueError(f"unknown time zone {v!r} (use an IANA name such as 'Europe/Paris')") from e
        return v

    @model_validator(mode="after")
    def _commands_of_the_system(self) -> BatchSettings:
        known = SYSTEM_COMMANDS.get(self.system)
        other = sorted(self.commands.model_fields_set - set(known)) if known is not None else []
        if other:
            raise _PathError(("batch", "commands", other[0]),
                             f"not a command of {self.system} (its commands: {', '.join(known or ())})")
        return self

    def command(self, name: str) -> str:
        """The path to run for one of the system's commands (squeue, scancel, qstat, qdel)."""
        return getattr(self.commands, name) or name

    def pbs_output(self, system: str) -> Literal["json", "xml", "text", "auto"]:
        return self.pbs_format or ("xml" if system == "torque" else "json")


@dataclass(frozen=True)
class BatchChoice:
    """The batch system in use, and how it was chosen (for the log and check-config)."""

    system: ResolvedSystem
    how: str  # "batch.system: auto; squeue runs"

    def summary(self) -> str:
        if self.system == "none":
            return f"batch system: none ({self.how}); off: {'; '.join(JOB_FEATURES)}"
        return f"batch system: {self.system} ({self.how})"


def choose_batch_system(section: BatchSettings, runs: Callable[[str], bool]) -> BatchChoice:
    """The system to use. ``runs(command)``: whether that command runs in the service's
    environment (reaper.batch.command_runs asks the real one); only asked for ``auto``."""
    if section.system != "auto":
        return BatchChoice(section.system, f"batch.system: {section.system}")
    squeue, qstat = section.command("squeue"), section.command("qstat")
    if runs(squeue):
        return BatchChoice("slurm", f"batch.system: auto; {squeue} runs")
    if runs(qstat):
        return BatchChoice("pbs", f"batch.system: auto; {qstat} runs")
    return BatchChoice("none", f"batch.system: auto; neither {squeue} nor {qstat} runs")


# --------------------------------------------------------------------------- the web page


class KeepSettings(Strict):
    """`web.keep`: the limits of "Keep running" (reaper.core.keep)."""

    max_extension: Duration = timedelta(hours=8)
    max_per_day: int = Field(default=3, ge=0, le=100)
    # The durations offered on the page; default: 1h, 2h, 4h, 8h up to max_extension, and max_extension.
    choices: list[Duration] | None = None

    @model_validator(mode="after")
    def _choices_fit(self) -> KeepSettings:
        for c in self.choices or ():
            if c <= timedelta(0):
                raise ValueError("keep.choices: every choice must be longer than 0")
            if c > self.max_extension:
                raise ValueError(
                    f"keep.choices: {format_duration(c)} is longer than keep.max_extension "
                    f"({format_duration(self.max_extension)})"
                )
        return self

    def policy(self) -> KeepPolicy:
        return KeepPolicy(
            max_extension=self.max_extension,
            max_per_day=self.max_per_day,
            choices=tuple(self.choices) if self.choices is not None else None,
        )


class WebSettings(Strict):
    """The `web` section: the reaper's page on the hub (reaper/web)."""

    admin_group: str | None = None
    keep: KeepSettings = KeepSettings()
    dry_run_cache: Duration = timedelta(seconds=60)
    listen: str | None = None
    prefix: str | None = None
    # Signs the notices' one-click keep links (reaper/notify/keeplinks.py): "${VAR}"; default: a
    # secret the reaper makes once and keeps in its database.
    link_secret: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None:
            return v
        u = urlparse(v)
        if u.scheme not in ("http", "https") or not u.port:
            raise ValueError(f"web.listen must look like http://127.0.0.1:8123, not {v!r}")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return "/" + v.strip("/") + "/" if v.strip("/") else "/"

    def page_prefix(self, env: Mapping[str, str] = os.environ) -> str:
        """The path the page is served under, ending in "/": ``web.prefix``, else the hub's
        ``JUPYTERHUB_SERVICE_PREFIX`` (it includes the hub's base_url), else ``/services/reaper/``."""
        prefix = self.prefix or env.get("JUPYTERHUB_SERVICE_PREFIX") or "/services/reaper/"
        return prefix if prefix.endswith("/") else prefix + "/"


class Settings(Strict):
    hub: HubSettings = HubSettings()
    probe: ProbeSettings = ProbeSettings()
    working: WorkingSettings = WorkingSettings()
    sweep_every: Duration = timedelta(minutes=5)
    dry_run: bool = False
    database_url: str = "sqlite:///reaper.sqlite"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    safety: SafetySettings = SafetySettings()
    defaults: PolicyFields = PolicyFields()
    rules: list[Rule] = Field(default_factory=list)
    notify: NotifySettings = NotifySettings()
    batch: BatchSettings = BatchSettings()  # the batch-system adapter (reaper/batch)
    slurm: SlurmSettings = SlurmSettings()
    orphans: OrphanSettings = OrphanSettings()
    web: WebSettings = WebSettings()
    # The line of each key written in the file ("slurm", "batch.system"), for later checks.
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _channels_configured(self) -> Settings:
        users: list[tuple[tuple[Any, ...], list[str]]] = [(("defaults", "channels"), list(self.defaults.channels))]
        users += [(("rules", i, "channels"), list(r.channels)) for i, r in enumerate(self.rules) if r.channels]
        for ch in ("email", "slack"):
            if getattr(self.notify, ch) is not None:
                continue
            for loc, chans in users:
                if ch in chans:
                    raise _PathError(loc, f"channel {ch!r} is used but notify.{ch} is not configured")
        return self

    @field_validator("sweep_every")
    @classmethod
    def _sweep_every(cls, v: timedelta) -> timedelta:
        if v < timedelta(seconds=1):
            raise ValueError("sweep_every must be at least 1s")
        return v

    @model_validator(mode="after")
    def _names_unique(self) -> Settings:
        seen: set[str] = set()
        for i, r in enumerate(self.rules):
            if r.name in seen:
                raise _PathError(("rules", i, "name"), f"duplicate rule name {r.name!r}")
            seen.add(r.name)
        return self

    def resolved_rules(self) -> list[ResolvedRule]:
        return [resolve(self.defaults, r, self.working.protect_idle) for r in self.rules]

    def default_rule(self) -> ResolvedRule:
        return resolve(self.defaults, None, self.working.protect_idle)

    def keep_policy(self) -> KeepPolicy:
        return self.web.keep.policy()

    def line_of(self, key: str) -> int | None:
        """The line of a key written in the file ("slurm", "batch.system"); None when not written."""
        return self._lines.get(key)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.hub.timezone)


class _PathError(ValueError):
    def __init__(self, loc: tuple[Any, ...], msg: str):
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


# --------------------------------------------------------------------------- loading


class ConfigError(Exception):
    """An invalid config file. str() is the admin-facing message, one problem per line."""

    def __init__(self, path: str, problems: list[tuple[int | None, str, str]]):
        self.path = path
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = []
        for line, key, msg in self.problems:
            where = f"{self.path}:{line}" if line else self.path
            lines.append(f"{where}: {key}: {msg}" if key else f"{where}: {msg}")
        return "\n".join(lines)


_SECRET_KEY = re.compile(r"(password|token|secret)$", re.I)
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest YAML node along loc."""
    best = node.start_mark.line + 1 if node is not None else None
    cur = node
    for part in loc:
        if isinstance(cur, yaml.MappingNode):
            nxt = None
            for k, v in cur.value:
                if k.value == part:
                    best = k.start_mark.line + 1
                    nxt = v
                    break
            if nxt is None:
                break
            cur = nxt
        elif isinstance(cur, yaml.SequenceNode) and isinstance(part, int) and part < len(cur.value):
            cur = cur.value[part]
            best = cur.start_mark.line + 1
        else:
            break
    return best


def _substitute_env(data: Any, loc: tuple[Any, ...], env: dict[str, str], problems: list) -> Any:
    if isinstance(data, dict):
        return {k: _substitute_env(v, (*loc, k), env, problems) for k, v in data.items()}
    if isinstance(data, list):
        return [_substitute_env(v, (*loc, i), env, problems) for i, v in enumerate(data)]
    if isinstance(data, str):
        key = str(loc[-1]) if loc else ""
        is_secret = bool(_SECRET_KEY.search(key))
        if is_secret and data and not _ENV_RE.fullmatch(data.strip()):
            problems.append((loc, "secrets must come from the environment: write ${VARIABLE}, not the value"))
            return data

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append((loc, f"environment variable {name} is not set"))
            return ""

        return _ENV_RE.sub(repl, data)
    return data


def _duplicate_keys(node: yaml.Node | None, loc: tuple[Any, ...]) -> list[tuple[int | None, str, str]]:
    """Keys given twice in one mapping (PyYAML silently keeps the last one)."""
    out: list[tuple[int | None, str, str]] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if key is not None and key != "<<":
                line = k.start_mark.line + 1
                if key in first:
                    out.append((line, _fmt_loc((*loc, key)),
                                f"duplicate key (also on line {first[key]}); give each key once"))
                else:
                    first[key] = line
            out += _duplicate_keys(v, (*loc, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out += _duplicate_keys(v, (*loc, i))
    return out


def _section_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys a mapping at loc accepts, for messages ("expected a mapping of keys (start, end)")."""
    model: Any = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for c in candidates:
            if isinstance(c, type) and issubclass(c, BaseModel):
                model = c
                break
            inner = [a for a in getattr(c, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            if inner:
                model = inner[0]
                break
        else:
            return []
    return list(getattr(model, "model_fields", {}))


def _template_problems(settings: Settings, root: yaml.Node | None) -> list[tuple[int | None, str, str]]:
    """Render every notice kind with notify.templates (strict undefined): problems at that key."""
    tdir = settings.notify.templates
    if not tdir:
        return []
    from .notify.render import check_templates  # late: render imports the model, not this module

    loc = ("notify", "templates")
    line = _line_of(root, loc)
    return [(line, _fmt_loc(loc), p) for p in check_templates(tdir)]


def _map_problems(settings: Settings, root: yaml.Node | None) -> list[tuple[int | None, str, str]]:
    """notify.email.address_map and notify.slack.user_map: readable YAML mappings of username: value."""
    out: list[tuple[int | None, str, str]] = []
    for section, key in (("email", "address_map"), ("slack", "user_map")):
        cfg = getattr(settings.notify, section)
        path = getattr(cfg, key, None) if cfg is not None else None
        if not path:
            continue
        loc = ("notify", section, key)
        try:
            data = yaml.safe_load(Path(os.path.expanduser(path)).read_text(encoding="utf-8"))
        except OSError as e:
            out.append((_line_of(root, loc), _fmt_loc(loc), f"cannot read {path}: {e.strerror or e}"))
            continue
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            out.append((_line_of(root, loc), _fmt_loc(loc), f"{where}: YAML syntax error"))
            continue
        if data is not None and not isinstance(data, dict):
            out.append((_line_of(root, loc), _fmt_loc(loc), f"{path} must be a mapping of username: value"))
    return out


def load_settings(path: str | os.PathLike[str] | None, *, env: dict[str, str] | None = None) -> Settings:
    """Read and validate a config file. Raises ConfigError with file, key path and line."""
    env = dict(os.environ) if env is None else env
    if path is None:
        return Settings()
    p = Path(path)
    name = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(name, [(None, "", f"cannot read the file: {e.strerror or e}")]) from e
    return parse_settings(text, name, env=env, base_dir=p.parent)


def parse_settings(text: str, name: str = "config.yaml", *, env: dict[str, str] | None = None,
                   base_dir: Path | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise ConfigError(name, [(line, "", f"YAML syntax error: {e.problem}")]) from e
    except yaml.YAMLError as e:
        raise ConfigError(name, [(None, "", f"YAML error: {e}")]) from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        line = root.start_mark.line + 1 if root is not None else 1
        raise ConfigError(name, [(line, "", "the top level must be a mapping of keys")])
    dups = _duplicate_keys(root, ())
    if dups:
        raise ConfigError(name, dups)

    env_problems: list[tuple[tuple[Any, ...], str]] = []
    data = _substitute_env(data, (), env, env_problems)
    if env_problems:
        raise ConfigError(name, [(_line_of(root, loc), _fmt_loc(loc), msg) for loc, msg in env_problems])

    # Relative SQLite paths are relative to the config file, not the working directory.
    db = data.get("database_url")
    if isinstance(db, str) and base_dir is not None and db.startswith("sqlite:///") and not db.startswith("sqlite:////"):
        rel = db.removeprefix("sqlite:///")
        if rel and rel != ":memory:":
            data["database_url"] = "sqlite:///" + str((base_dir / rel).resolve())

    # Relative paths of the notices (template folder, address and member maps) are relative to
    # the config file too.
    notify = data.get("notify")
    if isinstance(notify, dict) and base_dir is not None:
        notify = data["notify"] = dict(notify)
        for section, key in ((None, "templates"), ("email", "address_map"), ("slack", "user_map")):
            holder = notify if section is None else notify.get(section)
            if not isinstance(holder, dict):
                continue
            value = holder.get(key)
            if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
                holder = dict(holder)
                holder[key] = str((base_dir / value).resolve())
                if section is None:
                    notify = data["notify"] = holder
                else:
                    notify[section] = holder

    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(err["loc"])
            msg = err["msg"]
            ctx_err = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_err, _PathError):
                loc, msg = ctx_err.loc, ctx_err.msg
            elif msg.startswith("Value error, "):
                msg = msg.removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see config.yaml for every key)"
            elif err["type"] in ("model_type", "dict_type"):
                keys = _section_keys(loc)
                msg = "expected a mapping of keys" + (f" ({', '.join(keys)})" if keys else "")
            problems.append((_line_of(root, loc), _fmt_loc(loc), msg))
        raise ConfigError(name, problems) from None

    problems = []
    checks: list[tuple[tuple[Any, ...], ResolvedRule]] = [(("defaults",), settings.default_rule())]
    checks += [(("rules", i), r) for i, r in enumerate(settings.resolved_rules())]
    for prefix, rr in checks:
        for sub, msg in check_thresholds(rr):
            loc = (*prefix, *sub.split("."))
            problems.append((_line_of(root, loc), _fmt_loc(loc), msg))
    resolved = settings.resolved_rules()
    for i, r in enumerate(settings.rules[:-1]):
        if resolved[i].match.is_catch_all():
            later = ", ".join(x.name for x in settings.rules[i + 1 :])
            loc = ("rules", i, "match")
            problems.append(
                (_line_of(root, ("rules", i)), _fmt_loc(loc),
                 f"rule {r.name!r} matches every server, so the rules after it can never match ({later})")
            )
        for key in ("users", "groups", "servers", "partitions"):
            v = getattr(r.match, key)
            if v is not None and len(v) == 0:
                loc = ("rules", i, "match", key)
                problems.append((_line_of(root, loc), _fmt_loc(loc), "an empty list can never match"))
    if settings.rules:
        r = settings.rules[-1]
        for key in ("users", "groups", "servers", "partitions"):
            v = getattr(r.match, key)
            if v is not None and len(v) == 0:
                loc = ("rules", len(settings.rules) - 1, "match", key)
                problems.append((_line_of(root, loc), _fmt_loc(loc), "an empty list can never match"))
    problems += _template_problems(settings, root)
    problems += _map_problems(settings, root)
    if problems:
        raise ConfigError(name, problems)
    settings._lines.update(_key_lines(root))
    return settings


def _key_lines(root: yaml.Node | None) -> dict[str, int]:
    """The line of every top-level key and of the keys one level below ("batch.system")."""
    out: dict[str, int] = {}
    if not isinstance(root, yaml.MappingNode):
        return out
    for k, v in root.value:
        if not isinstance(k, yaml.ScalarNode):
            continue
        out[str(k.value)] = k.start_mark.line + 1
        if isinstance(v, yaml.MappingNode):
            for k2, _ in v.value:
                if isinstance(k2, yaml.ScalarNode):
                    out[f"{k.value}.{k2.value}"] = k2.start_mark.line + 1
    return out


def batch_problems(settings: Settings, choice: BatchChoice) -> list[tuple[int | None, str, str]]:
    """`slurm:` or `orphans:` written while no batch system is used: they would do nothing.
    (line, key, message) as ConfigError takes them."""
    if choice.system != "none":
        return []
    out: list[tuple[int | None, str, str]] = []
    for key in ("slurm", "orphans"):
        if key in settings.model_fields_set:
            out.append((settings.line_of(key), key,
                        f"set, but no batch system is used ({choice.how}), so it does nothing: "
                        f"set batch.system (and batch.env, e.g. SLURM_CONF), or remove {key}"))
    return out


def effective_yaml(settings: Settings) -> str:
    """The effective settings (defaults filled in) as YAML, secrets masked."""
    data = settings.model_dump(mode="json")
    hub = data.get("hub", {})
    hub["api_url"] = settings.hub.effective_api_url()
    hub["public_url"] = settings.hub.effective_public_url()
    hub["api_token"] = "(set)" if settings.hub.effective_token() else "(missing: set JUPYTERHUB_API_TOKEN)"

    def mask(obj: Any, key: str = "") -> Any:
        if isinstance(obj, dict):
            return {k: mask(v, k) for k, v in obj.items()}
        if isinstance(obj, list):
            return [mask(v) for v in obj]
        if isinstance(obj, str) and _SECRET_KEY.search(key) and key != "api_token":
            return "(set)" if obj else ""
        return obj

    data = mask(data)
    data["database_url"] = re.sub(r"//([^:/@]+):([^@]+)@", r"//\1:***@", data["database_url"])
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def default_config_path() -> str | None:
    """--config, else $REAPER_CONFIG, else ./config.yaml when present, else built-in defaults."""
    env = os.environ.get("REAPER_CONFIG")
    if env:
        return env
    here = Path("config.yaml")
    return str(here) if here.exists() else None
