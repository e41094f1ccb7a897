"""jupyterhub-reaper run | sweep | status | check-config | db | demo | notify"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from .config import ConfigError, Settings, default_config_path, effective_yaml, load_settings


def _load(path: str | None) -> Settings:
    return load_settings(path) if path else Settings()


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", default=None,
        help="config.yaml (default: $REAPER_CONFIG, else ./config.yaml, else built-in defaults)",
    )


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.path or args.config or default_config_path()
    settings = _load(path)
    from .notify.render import check_templates

    problems = check_templates(settings.notify.templates) if settings.notify.templates else []
    if problems:
        for p in problems:
            print(f"{path}: notify.templates: {p}", file=sys.stderr)
        return 2
    print(f"# {path or '(built-in defaults)'}: valid. Effective settings, defaults filled in:")
    print(effective_yaml(settings), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .service import run_service

    return run_service(args.config or default_config_path())


def cmd_sweep(args: argparse.Namespace) -> int:
    from .service import make_hub_client, make_outbox, make_stop_hook, setup_logging
    from .store import Store
    from .sweep import Sweeper, format_table

    settings = _load(args.config or default_config_path())
    setup_logging("WARNING" if args.dry_run and not args.verbose else settings.log_level)
    dry = True if args.dry_run else settings.dry_run

    async def go() -> int:
        store = await asyncio.to_thread(Store.open, settings.database_url)
        hub = make_hub_client(settings)
        try:
            outbox = make_outbox(settings, store)
            sweeper = Sweeper(settings, hub, store, notifier=outbox,
                              stop_hook=None if dry else make_stop_hook(settings))
            res = await sweeper.run_once(dry_run=dry)
        finally:
            await hub.aclose()
            await asyncio.to_thread(store.close)
        print(format_table(res, settings.tz))
        return 0 if res.ok else 1

    if not args.once:
        print("sweep runs one sweep; add --once (the service runs them on a schedule: jupyterhub-reaper run)",
              file=sys.stderr)
        return 2
    return asyncio.run(go())


def cmd_status(args: argparse.Namespace) -> int:
    from .store import Store

    settings = _load(args.config or default_config_path())
    store = Store.open(settings.database_url)
    try:
        rows = store.runs_overview()
        last = store.last_successful_sweep()
    finally:
        store.close()
    print(f"last successful sweep: {last.isoformat() if last else 'never'}")
    if not rows:
        print("no running servers recorded")
        return 0
    cols = ["user", "server", "state", "action", "reason"]
    for r in rows:
        print("  ".join(str(r.get(c) or "-") for c in cols))
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from .store import Store

    settings = _load(args.config or default_config_path())
    store = Store.open(settings.database_url, upgrade=False)
    try:
        if args.action == "upgrade":
            store.upgrade(args.revision or "head")
        elif args.action == "downgrade":
            if not args.revision:
                print("db downgrade needs a revision (e.g. base)", file=sys.stderr)
                return 2
            store.downgrade(args.revision)
        print(f"database at revision {store.current_revision() or '(empty)'}")
    finally:
        store.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jupyterhub-reaper",
        description="Idle-notebook reaper and reminder service for JupyterHub (runs as a hub managed service).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("run", help="run the service (what the hub starts)")
    _config_arg(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("sweep", help="run one sweep now and print what was decided")
    _config_arg(s)
    s.add_argument("--once", action="store_true", help="one sweep, then exit")
    s.add_argument("--dry-run", action="store_true", help="decide and print; notify nothing, stop nothing, record nothing")
    s.add_argument("--verbose", "-v", action="store_true")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("status", help="latest state of every server run, from the database")
    _config_arg(s)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("check-config", help="validate config.yaml and print the effective policy")
    s.add_argument("path", nargs="?", default=None)
    _config_arg(s)
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("db", help="database schema: upgrade [REV] | downgrade REV | current")
    s.add_argument("action", choices=["upgrade", "downgrade", "current"])
    s.add_argument("revision", nargs="?", default=None)
    _config_arg(s)
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("demo", help="start a local demo hub on 127.0.0.1 with the reaper as its service")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--state-dir", default=".demo")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
