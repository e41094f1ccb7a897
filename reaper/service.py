"""The long-running service: the one place that wires config, store, hub client, outbox and sweeps.

Started by the hub as a managed service (``jupyterhub-reaper run``). Sweeps run on an APScheduler
interval (never overlapping, missed runs coalesced). SIGTERM and SIGINT stop it promptly; SIGHUP
reloads config.yaml (an invalid file is rejected and the last good policy kept).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlparse

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .config import ConfigError, Settings, load_settings
from .hub import HubClient
from .notify.outbox import Outbox
from .store import Store
from .sweep import Sweeper, SweepResult, utcnow

log = logging.getLogger("reaper.service")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("httpx", "httpcore", "apscheduler", "alembic", "tornado.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def make_hub_client(settings: Settings) -> HubClient:
    token = settings.hub.effective_token()
    if not token:
        raise ConfigError(
            "hub.api_token",
            [(None, "hub.api_token", "no hub token: set JUPYTERHUB_API_TOKEN (the hub does for managed services)")],
        )
    return HubClient(
        settings.hub.effective_api_url(),
        token,
        public_url=settings.hub.effective_public_url(),
        probe_via=settings.probe.via,
        timeout=settings.hub.timeout.total_seconds(),
        probe_timeout=settings.probe.timeout.total_seconds(),
        retries=settings.hub.retries,
        hub_concurrency=settings.hub.concurrency,
        probe_concurrency=settings.probe.concurrency,
        stop_concurrency=settings.safety.stop_concurrency,
        page_size=settings.hub.page_size,
        probe_token=settings.probe.token or None,
        probe_terminals=settings.probe.terminals,
        http=settings.hub.http,
    )


def make_outbox(settings: Settings, store: Any, *, observer: Any = None) -> Outbox:
    from .notify.channels import build_channels  # log, and e-mail and Slack when configured

    return Outbox(
        store,
        build_channels(settings, store=store),
        max_attempts=settings.notify.max_attempts,
        base_delay=settings.notify.retry_base,
        observer=observer,
    )


def make_stop_hook(settings: Settings, store: Any) -> Any:
    from .batch.guard import build_guard

    return build_guard(settings, store)


def lease_holder_is_dead(holder: str) -> bool:
    """A lease holder is "host:pid". True only when it is on this host and that process is gone."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class ReaperService:
    def __init__(self, config_path: str | None, settings: Settings) -> None:
        self.config_path = config_path
        self.settings = settings
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = asyncio.Event()
        self.store: Store | None = None
        self.hub: HubClient | None = None
        self.sweeper: Sweeper | None = None
        self.outbox: Outbox | None = None
        self.last_result: SweepResult | None = None
        self.scheduler: AsyncIOScheduler | None = None
        self.web: Any = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        s = self.settings
        # a migration runs in a child interpreter: this process stays free of alembic
        self.store = await asyncio.to_thread(lambda: Store.open(s.database_url, isolated=True))
        self.hub = make_hub_client(s)
        from .metrics import count_notice

        self.outbox = make_outbox(s, self.store, observer=count_notice)
        self.sweeper = Sweeper(s, self.hub, self.store, notifier=self.outbox, stop_hook=make_stop_hook(s, self.store),
                              keep_rows=False)  # counts, not 10,000 rows (dry runs keep theirs)
        self.scheduler = AsyncIOScheduler(timezone="UTC")
        self.scheduler.add_job(
            self.tick,
            "interval",
            seconds=s.sweep_every.total_seconds(),
            next_run_time=datetime.now().astimezone(),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            id="sweep",
        )
        # Retries of notices that failed are due between sweeps too.
        self.scheduler.add_job(
            self.drain_outbox,
            "interval",
            seconds=min(30.0, s.sweep_every.total_seconds()),
            max_instances=1,
            coalesce=True,
            id="outbox",
        )
        self.scheduler.start()
        await self.start_web()
        log.info(
            "reaper started: hub %s, sweep every %s, database %s%s",
            s.hub.effective_api_url(),
            s.sweep_every,
            urlparse(s.database_url).scheme,
            ", DRY RUN" if s.dry_run else "",
        )

    async def start_web(self) -> None:
        try:
            from .web.app import start_web
        except ImportError:
            return
        self.web = await start_web(self)

    async def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.web is not None:
            self.web.stop()
        if self.hub is not None:
            await self.hub.aclose()
        if self.store is not None:
            try:  # hand over at once to a standby reaper, if any
                await asyncio.to_thread(self.store.lease.release, self.holder)
            except Exception as e:
                log.warning("could not release the lease: %s", e)
            await asyncio.to_thread(self.store.close)
        log.info("reaper stopped")

    async def tick(self) -> None:
        assert self.store is not None and self.sweeper is not None
        now = utcnow()
        ttl = max(self.settings.sweep_every * 3, timedelta(minutes=2))
        try:
            mine = await asyncio.to_thread(self.store.lease.acquire, self.holder, now, ttl)
        except Exception as e:
            log.error("cannot reach the database, skipping this sweep: %s", e)
            return
        if not mine:
            holder = await asyncio.to_thread(self.store.lease.holder, now)
            if holder and lease_holder_is_dead(holder):
                log.warning("the lease is held by %s, which is no longer running (killed?): taking over", holder)
                await asyncio.to_thread(self.store.lease.release, holder)
                mine = await asyncio.to_thread(self.store.lease.acquire, self.holder, now, ttl)
        if not mine:
            log.warning("another reaper process holds the lease on this database (%s); waiting (not acting)",
                        await asyncio.to_thread(self.store.lease.holder, now))
            return
        guard = self.sweeper.stop_hook
        before = (getattr(guard, "scancels", 0), getattr(guard, "orphans_cancelled", 0))
        self.last_result = await self.sweeper.run_once()
        from . import metrics

        metrics.record_sweep(self.last_result)
        scancels = getattr(guard, "scancels", 0) - before[0]
        orphans = getattr(guard, "orphans_cancelled", 0) - before[1]
        if scancels:
            metrics.count_scancel(scancels)
        if orphans:
            metrics.count_orphan(orphans)

    async def drain_outbox(self) -> None:
        if self.outbox is None or self.store is None:
            return
        try:
            mine = await asyncio.to_thread(self.store.lease.acquire, self.holder, utcnow(),
                                           max(self.settings.sweep_every * 3, timedelta(minutes=2)))
            if mine:
                await self.outbox.drain(utcnow())
        except Exception as e:
            log.error("outbox drain failed (will retry): %s", e)

    def reload(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP: no config file to reload")
            return
        try:
            new = load_settings(self.config_path)
        except ConfigError as e:
            log.error("SIGHUP: config rejected, keeping the last good policy:\n%s", e)
            return
        changed_db = new.database_url != self.settings.database_url
        self.settings = new
        if self.sweeper is not None:
            self.sweeper.settings = new
        if self.scheduler is not None:
            self.scheduler.reschedule_job("sweep", trigger="interval", seconds=new.sweep_every.total_seconds())
        logging.getLogger().setLevel(new.log_level)
        log.info("SIGHUP: config reloaded from %s%s", self.config_path,
                 " (database_url changes need a restart)" if changed_db else "")

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        try:
            await self.stopping.wait()
            log.info("signal received, stopping")
        finally:
            await self.stop()


def tune_gc() -> None:
    """Garbage collection for a long-running service that builds one row per server per sweep:
    the objects alive at start-up (modules, settings, the database layer) are frozen out
    of every collection, and the youngest generation is collected every 10,000 allocations instead
    of 700. On a 10,000-server sweep the collector's time fell from 1.9 s to 0.3 s and the sweep's
    CPU by ~15 % (benchmarks/); cycles are still collected."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def run_service(config_path: str | None) -> int:
    try:
        settings = load_settings(config_path) if config_path else Settings()
    except ConfigError as e:
        setup_logging()
        log.error("invalid configuration:\n%s", e)
        return 2
    setup_logging(settings.log_level)
    service = ReaperService(config_path, settings)
    tune_gc()
    try:
        asyncio.run(service.serve())
    except (ConfigError, ValueError, OSError) as e:
        log.error("cannot start: %s", e)
        return 2
    return 0

