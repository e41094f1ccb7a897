"""JupyterLab in a real browser on a RealHub: shared by tests/integration/test_lab_notice.py and
test_lab_e2e.py.

- :func:`lab_hub_config` writes a hub config on top of the shipped one that puts this checkout's
  prebuilt JupyterLab extension (labextension/, built by setup.py's own step when stale) on the
  single-user servers' JUPYTER_PATH and this checkout on their PYTHONPATH (the companion).
- :func:`open_lab` logs a user in at the hub in Chromium and opens their JupyterLab (answering
  JupyterLab's own "news" question, so that only the reaper's notifications remain).
- :func:`set_hidden` makes the tab hidden or visible to the page (``document.visibilityState``),
  which is what JupyterLab's polls and the extension's look at.
- :class:`LoopThread` runs coroutines (the reaper's sweeps, its web page) on an asyncio loop in a
  thread of their own, beside Playwright's sync API, which refuses to run inside a loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shutil
import threading
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from . import require_real_part
from .hub import HUB_CONFIG

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

WRAPPER = """
c = get_config()  # noqa: F821
load_subconfig({shipped!r})  # noqa: F821
c.Spawner.environment.update({{"JUPYTER_PATH": {share!r}, "PYTHONPATH": {root!r}}})
{extra}
"""

T = TypeVar("T")


def built_labextension() -> Path:
    """labextension/prebuilt, built by setup.py's own step when missing or stale."""
    spec = importlib.util.spec_from_file_location("reaper_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    if setup.stale():
        require_real_part(shutil.which("npm") is not None, "Node.js and npm (to build labextension/)")
        setup.build_labextension()
    return setup.OUT


def lab_hub_config(tmp_path: Path, extra: str = "") -> Path:
    """A hub config file: the shipped one, with the extension and the companion in the servers."""
    share = tmp_path / "share"
    (share / "labextensions").mkdir(parents=True, exist_ok=True)
    link = share / "labextensions" / "jupyterhub-reaper"
    if not link.exists():
        link.symlink_to(built_labextension())
    wrapper = tmp_path / "jupyterhub_config.py"
    wrapper.write_text(WRAPPER.format(shipped=str(HUB_CONFIG), share=str(share), root=str(ROOT), extra=extra))
    return wrapper


def require_browser() -> None:
    require_real_part(Path(CHROMIUM).exists(), "Debian's chromium (/usr/bin/chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        require_real_part(False, "playwright for Python")


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def still(page) -> None:
    """No notification sliding in or out (for the screenshots)."""
    page.wait_for_function("() => !document.querySelector('.Toastify--animate, .Toastify__slide-exit--bottom-right')")
    page.wait_for_timeout(300)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def login(page, hub, user: str) -> None:
    page.goto(f"{hub.base_url}/hub/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", hub.password)
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url(re.compile(r".*/user/.*"))


def open_lab(page, hub, user: str, path: str = "lab", *, news: bool = True) -> None:
    """The user's JupyterLab at ``path`` (under their server), once its status bar shows; ``news``:
    answer JupyterLab's own "official Jupyter news" question (asked once per browser profile)."""
    from playwright.sync_api import expect

    page.goto(hub.server_url(user) + path)
    expect(page.locator("#jp-main-statusbar")).to_be_visible(timeout=60_000)
    if news:
        toast = page.locator(".Toastify__toast").filter(has_text="official Jupyter news")
        toast.get_by_role("button", name="No", exact=True).click(timeout=30_000)
        expect(toast).to_have_count(0)


def set_hidden(page, hidden: bool) -> None:
    """The tab hidden (in the background) or visible, as the page sees it."""
    page.evaluate("""(hidden) => {
        Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => hidden ? 'hidden' : 'visible'});
        Object.defineProperty(document, 'hidden', {configurable: true, get: () => hidden});
        document.dispatchEvent(new Event('visibilitychange'));
    }""", hidden)


class LoopThread:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for the coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="reaper-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
