"""jupyterhub-reaper run | sweep | status | check-config | db | demo | notify"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence

from .config import (
    ConfigError,
    Settings,
    batch_problems,
    choose_batch_system,
    default_config_path,
    effective_yaml,
    load_settings,
)


def _load(path: str | None) -> Settings:
    return load_settings(path) if path else Settings()


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", default=None,
        help="config.yaml (default: $REAPER_CONFIG, else ./config.yaml, else built-in defaults)",
    )


def cmd_check_config(args: argparse.Namespace, *, runs: Callable[[str], bool] | None = None) -> int:
    """``runs``: the probe of ``batch.system: auto`` (default: reaper.batch.command_runs)."""
    path = args.path or args.config or default_config_path()
    settings = _load(path)
    from .batch import command_runs
    from .notify.render import check_templates

    choice = choose_batch_system(settings.batch, runs or command_runs(settings.batch))
    unused = batch_problems(settings, choice)  # slurm: or orphans: without a batch system
    if unused:
        print(ConfigError(path or "(built-in defaults)", unused).render(), file=sys.stderr)

    problems = check_templates(settings.notify.templates) if settings.notify.templates else []
    try:
        from .notify.channels import build_channels

        build_channels(settings)
    except (ValueError, OSError) as e:
        problems.append(str(e))
    for p in problems:
        print(f"{path}: notify: {p}", file=sys.stderr)
    if problems or unused:
        print(f"# {choice.summary()}", file=sys.stderr)
        return 2
    print(f"# {path or '(built-in defaults)'}: valid. Effective settings, defaults filled in:")
    print(f"# {choice.summary()}")
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
                              stop_hook=make_stop_hook(settings, store))
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
    from datetime import UTC, datetime, timedelta

    from .core.model import humanize
    from .store import Store

    settings = _load(args.config or default_config_path())
    tz = settings.tz
    store = Store.open(settings.database_url)
    now = datetime.now(UTC)
    try:
        rows = store.reports.runs_overview()
        last = store.reports.last_successful_sweep()
        actions = store.reports.recent_actions(now - timedelta(days=1), limit=args.actions)
        depth = store.outbox.depth()
    finally:
        store.close()

    def when(t: datetime | None) -> str:
        return t.astimezone(tz).strftime("%Y-%m-%d %H:%M") if t else "-"

    ago = f" ({humanize(now - last)} ago)" if last else ""
    print(f"last successful sweep: {when(last)}{ago}; notices waiting for delivery: {depth}")
    print()
    if rows:
        table = [("USER", "SERVER", "STATE", "ACTION", "NEXT", "REASON")]
        for r in rows:
            table.append((r.user, r.server or "-", r.state or "-", r.action or "-", when(r.next_at), r.reason or ""))
        widths = [max(len(row[i]) for row in table) for i in range(5)]
        for row in table:
            print("  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True)) + "  " + row[5])
    else:
        print("no running servers recorded")
    if actions:
        print("\nrecent actions (24 h):")
        for a in actions:
            who = f"{a.user}/{a.server}" if a.server else str(a.user or "-")
            print(f"  {when(a.at)}  {a.kind:<14} {'ok ' if a.ok else 'FAILED'} {who}: {a.detail}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from .store import Store

    settings = _load(args.config or default_config_path())
    store = Store.open(settings.database_url, upgrade=False)
    try:
        if args.action == "upgrade":
            store.db.upgrade(args.revision or "head")
        elif args.action == "downgrade":
            if not args.revision:
                print("db downgrade needs a revision (e.g. base)", file=sys.stderr)
                return 2
            store.db.downgrade(args.revision)
        print(f"database at revision {store.db.current_revision() or '(empty)'}")
    finally:
        store.close()
    return 0


def cmd_notify(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from datetime import UTC, datetime

    from .core.model import NoticeKind
    from .notify.channels import keep_url
    from .notify.render import render, sample_context

    settings = _load(args.config or default_config_path())
    now = datetime.now(UTC)
    public = settings.hub.effective_public_url()
    user = args.user or "alice"
    ctx = replace(
        sample_context(now),
        username=user,
        hub_name=settings.hub.name,
        hub_url=f"{public}/hub/",
        server_url=f"{public}/user/{user}/{args.server + '/' if args.server else ''}",
        control_panel_url=f"{public}/hub/home",
        keep_url=keep_url(settings, user, args.server or ""),
        server_name=args.server,
        server_label=f'server "{args.server}"' if args.server else "server",
        tz=settings.hub.timezone,
        admin_contact=settings.notify.admin_contact,
    )
    kind = NoticeKind(args.kind)
    rendered = render(kind, ctx, template_dir=settings.notify.templates)
    if args.action == "preview":
        print(f"Subject: {rendered.subject}\n")
        print(rendered.text)
        if args.html:
            print("\n----- HTML -----\n" + rendered.html)
        if args.slack:
            print("\n----- Slack -----\n" + rendered.slack_text)
        return 0

    # notify test --to ADDRESS | @slackuser: one real message through the configured channel
    from .notify.channels import EmailChannel, SlackChannel

    target = args.to
    if not target:
        print("notify test needs --to ADDRESS or --to @slack-member-or-email", file=sys.stderr)
        return 2

    async def send() -> str:
        if target.startswith("@"):
            if settings.notify.slack is None:
                raise SystemExit("notify.slack is not configured")
            ch = SlackChannel(settings, email=None)
            who = target[1:]
            member = await ch.sender.lookup_user(who) if "@" in who else who
            if member is None:
                raise SystemExit(f"{who}: not found on Slack (users_not_found)")
            return await ch.sender.send(member, rendered)
        if settings.notify.email is None:
            raise SystemExit("notify.email is not configured")
        return await EmailChannel(settings).sender.send(target, rendered)

    from .notify.outbox import DeliveryError

    try:
        ref = asyncio.run(send())
    except DeliveryError as e:
        print(f"not delivered ({'permanent' if e.permanent else 'temporary'} failure): {e}", file=sys.stderr)
        return 1
    print(f"sent {kind.value} notice to {target} ({ref})")
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

    s = sub.add_parser("status", help="latest state of every server run and recent actions, from the database")
    s.add_argument("--actions", type=int, default=20, help="how many recent actions to show")
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

    s = sub.add_parser("notify", help="preview KIND --user NAME | test KIND --to ADDRESS|@slackuser")
    s.add_argument("action", choices=["preview", "test"])
    s.add_argument("kind", nargs="?", default="warning",
                   choices=["warning", "reminder", "final", "stopped", "walltime", "orphan"])
    s.add_argument("--user", default=None, help="render for this user name")
    s.add_argument("--server", default="", help="a named server (default: the default server)")
    s.add_argument("--to", default=None, help="test: an e-mail address, or @member-id / @email for Slack")
    s.add_argument("--html", action="store_true", help="preview: also print the HTML part")
    s.add_argument("--slack", action="store_true", help="preview: also print the Slack text")
    _config_arg(s)
    s.set_defaults(func=cmd_notify)

    s = sub.add_parser("demo", help="start a local demo hub on 127.0.0.1 with the reaper as its service")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--state-dir", default=".demo")
    s.add_argument("--smtp-port", type=int, default=8025, help="the local mail sink's port (0: log only)")
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
