"""Notice templates: every kind renders, hostile values are escaped, overrides and checks work."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reaper.core.model import NoticeKind
from reaper.notify.render import (
    TemplateContext,
    check_templates,
    context_from,
    format_localtime,
    format_relative,
    render,
    sample_context,
)

HOSTILE = '<script>alert("x")</script>'


@pytest.mark.parametrize("kind", list(NoticeKind))
def test_every_kind_renders_on_every_channel_with_the_sample_context(kind: NoticeKind) -> None:
    r = render(kind, sample_context())
    assert r.kind == kind.value
    assert r.subject.startswith("[Example JupyterHub] ") and "\n" not in r.subject
    assert "alice" in r.text and r.text.endswith("\n")
    assert "\n\n\n" not in r.text
    assert r.html.lstrip().startswith("<!DOCTYPE html>") and "Hello alice," in r.html
    assert r.slack_text and r.slack_blocks[0] == {"type": "section", "text": {"type": "mrkdwn", "text": r.slack_text}}
    assert "None" not in r.text and "None" not in r.slack_text


@pytest.mark.parametrize("kind", list(NoticeKind))
def test_every_kind_renders_when_optional_facts_are_unknown(kind: NoticeKind) -> None:
    ctx = TemplateContext(username="bob", hub_url="https://h/hub/", server_url="https://h/user/bob/",
                        control_panel_url="https://h/hub/home", now=datetime(2026, 1, 1, tzinfo=UTC))
    r = render(kind, ctx)
    assert "None" not in r.text and "None" not in r.html and "None" not in r.slack_text
    assert "your server " in r.text.lower() or kind is NoticeKind.ORPHAN
    assert "your your" not in r.text.lower() + r.subject.lower() + r.slack_text.lower()


def test_warning_says_which_server_where_why_when_and_how_to_stop_or_keep_it() -> None:
    r = render(NoticeKind.WARNING, sample_context())
    t = r.text
    assert 'Your server "gpu1" on Example JupyterHub looks unused' in t
    assert "Slurm job 4242 on node cn-a001, partition main" in t and "Holds: 4 CPUs, 1 GPU, 16 GB." in t
    assert "Why: window closed 3h13m ago." in t
    assert "no browser connected since 10:05, kernels idle" in t
    assert "It has been idle for 3h13m (since 10:05 EST, Wed 25 Nov)" in t
    assert "When: stop at 14:00 EST, Wed 25 Nov (in 42 min)" in t
    assert "Stop it now: Control Panel > Stop My Server, https://hub.example.org/hub/home" in t
    assert "https://hub.example.org/user/alice/gpu1/" in t
    assert "one click keeps it running for 2h: https://hub.example.org/services/reaper/keep-link?t=SAMPLE.TOKEN" in t
    assert "support@example.org" in t
    assert r.subject == '[Example JupyterHub] Your server "gpu1" is still running - it will be stopped at 14:00 EST, Wed 25 Nov'


def test_default_server_is_called_your_server_and_no_keep_link_means_no_keep_button() -> None:
    ctx = replace(sample_context(), server_name="", server_label="", keep_url=None)
    r = render(NoticeKind.REMINDER, ctx)
    assert "your server on Example JupyterHub" in r.text
    assert "one click" not in r.text and "Keep running" not in r.html
    [actions] = [b for b in r.slack_blocks if b["type"] == "actions"]
    assert [e["text"]["text"] for e in actions["elements"]] == ["Open my server", "Control panel"]


def test_slack_blocks_carry_link_buttons_to_open_keep_and_control_panel() -> None:
    ctx = sample_context()
    r = render(NoticeKind.FINAL, ctx)
    [actions] = [b for b in r.slack_blocks if b["type"] == "actions"]
    assert [(e["type"], e["text"]["text"], e["url"]) for e in actions["elements"]] == [
        ("button", "Keep running for 2h", ctx.keep_url),
        ("button", "Open my server", ctx.server_url),
        ("button", "Control panel", ctx.control_panel_url),
    ]
    assert any(b["type"] == "context" for b in r.slack_blocks)
    assert f"<{ctx.control_panel_url}|Control Panel>" in r.slack_text


def test_context_reads_where_and_what_from_every_spawners_options() -> None:
    from reaper.store import NoticeContext

    now = datetime(2026, 11, 25, 18, 18, tzinfo=UTC)

    def ctx_of(opts: dict[str, object]) -> TemplateContext:
        notice = NoticeContext(user="alice", server="", started=now, url="/user/alice/", user_options=dict(opts),
                               last_activity=now)
        return context_from(notice, public_url="https://hub.example.org", tz="UTC", now=now)

    ours = ctx_of({"partition": "gpu", "runtime": "8:00:00", "memory": "32G", "gpus": 2})
    stock = ctx_of({"req_partition": "gpu", "req_nprocs": "8", "req_memory": "32000", "req_ngpus": "2"})
    form = ctx_of({"partition": "gpu", "nprocs": 8, "memory": 32768, "gpus": "gpu:a100:2", "runtime": 8.0})
    assert (ours.partition, ours.gpus, ours.cpus, ours.mem) == ("gpu", 2, None, "32 GB")
    assert (stock.partition, stock.gpus, stock.cpus, stock.mem) == ("gpu", 2, 8, "31.2 GB")
    assert (form.partition, form.gpus, form.cpus, form.mem) == ("gpu", "a100:2", 8, "32 GB")
    assert ctx_of({"gpus": 0, "memory": ""}).gpus is None
    assert "8 CPUs, GPU a100:2, 32 GB" in render(NoticeKind.WARNING, form).text


def test_html_escapes_script_in_server_name_and_user_options() -> None:
    ctx = replace(sample_context(), server_name=HOSTILE, server_label="",
                  user_options={"profile": HOSTILE, HOSTILE: "x"}, node="<b>n</b>")
    for kind in NoticeKind:
        r = render(kind, ctx)
        assert "<script>" not in r.html, kind
        assert "<b>n</b>" not in r.html
    r = render(NoticeKind.WARNING, ctx)
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in r.html
    # plain text is shown as is (it is text, not markup)
    assert HOSTILE in r.text


def test_slack_text_escapes_control_characters_so_values_cannot_forge_links_or_mentions() -> None:
    ctx = replace(sample_context(), server_name="a&b <!channel> <https://evil|x>", server_label="",
                  user_options={"o": "<@U123>"}, node="<!here>")
    for kind in NoticeKind:
        r = render(kind, ctx)
        for b in r.slack_blocks:
            texts = [b["text"]["text"]] if b["type"] == "section" else [
                e["text"] for e in b.get("elements", []) if e.get("type") == "mrkdwn"]
            for t in texts:
                assert "<!channel>" not in t and "<https://evil|x>" not in t and "<!here>" not in t
    r = render(NoticeKind.WARNING, ctx)
    assert "a&amp;b &lt;!channel&gt; &lt;https://evil|x&gt;" in r.slack_text
    # our own links stay links
    assert "<https://hub.example.org/hub/home|Control Panel>" in r.slack_text


def test_times_are_shown_in_the_hub_time_zone() -> None:
    t = datetime(2026, 7, 1, 18, 0, tzinfo=UTC)
    assert format_localtime(t, "America/Toronto") == "14:00 EDT, Wed 1 Jul"
    assert format_localtime(t, "Europe/Paris") == "20:00 CEST, Wed 1 Jul"
    assert format_localtime(t, "America/Toronto", with_date=False) == "14:00 EDT"
    ctx = replace(sample_context(), tz="Asia/Tokyo")
    assert "04:00 JST, Thu 26 Nov" in render(NoticeKind.WARNING, ctx).text


def test_relative_times() -> None:
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert format_relative(now + timedelta(minutes=42), now) == "in 42 min"
    assert format_relative(now + timedelta(hours=3, minutes=10), now) == "in 3h10m"
    assert format_relative(now - timedelta(minutes=5), now) == "5 min ago"
    assert format_relative(now + timedelta(seconds=20), now) == "now"


def test_context_round_trips_through_json() -> None:
    import json

    ctx = sample_context()
    assert TemplateContext.from_json(json.loads(json.dumps(ctx.to_json()))) == ctx


def test_packaged_templates_pass_the_check() -> None:
    assert check_templates(None) == []


def test_override_dir_takes_precedence_and_keeps_the_other_files(tmp_path: Path) -> None:
    (tmp_path / "warning.subject.txt").write_text("Idle: {{ server_label }} of {{ username }}\n")
    (tmp_path / "warning.txt").write_text("Site text for {{ username }}; stop at {{ stop_at|localtime }}.\n")
    assert check_templates(str(tmp_path)) == []
    r = render(NoticeKind.WARNING, sample_context(), template_dir=str(tmp_path))
    assert r.subject == 'Idle: server "gpu1" of alice'
    assert r.text == "Site text for alice; stop at 14:00 EST, Wed 25 Nov.\n"
    assert "Hello alice," in r.html  # the packaged HTML is still used
    assert render(NoticeKind.WARNING, sample_context()).subject.startswith("[Example JupyterHub]")


def test_check_templates_names_the_file_using_an_undocumented_variable(tmp_path: Path) -> None:
    (tmp_path / "final.txt").write_text("Hi {{ username }},\n{{ gpu_count }} GPUs\n")
    problems = check_templates(str(tmp_path))
    assert len(problems) == 1
    assert str(tmp_path / "final.txt") in problems[0] and "gpu_count" in problems[0]
    assert ":2:" in problems[0]  # the line


def test_check_templates_reports_an_undefined_variable_in_an_included_file(tmp_path: Path) -> None:
    (tmp_path / "_footer.txt").write_text("{{ hub_name }} {{ support_phone }}\n")
    problems = check_templates(str(tmp_path))
    assert problems and all(str(tmp_path / "_footer.txt") in p for p in problems)
    assert "support_phone" in problems[0]


def test_check_templates_reports_syntax_errors_unknown_files_and_missing_dirs(tmp_path: Path) -> None:
    (tmp_path / "stopped.html").write_text("{% if username %}unclosed\n")
    (tmp_path / "warnig.txt").write_text("typo in the name\n")
    problems = check_templates(str(tmp_path))
    assert any("stopped.html" in p and "TemplateSyntaxError" in p for p in problems)
    assert any("warnig.txt" in p and "not a template name" in p for p in problems)
    assert check_templates(str(tmp_path / "nope")) == [f"{tmp_path / 'nope'}: not a directory"]


def test_rendering_an_override_with_a_bogus_variable_raises(tmp_path: Path) -> None:
    import jinja2

    (tmp_path / "orphan.slack.txt").write_text("{{ bogus }}")
    with pytest.raises(jinja2.UndefinedError):
        render(NoticeKind.ORPHAN, sample_context(), template_dir=str(tmp_path))


def test_context_from_a_stored_notice_names_the_server_where_it_runs_and_the_links() -> None:
    from reaper.core.model import Action, Decision, HubServer, Observation, State
    from reaper.store import notice_context

    now = datetime(2026, 11, 25, 18, 18, tzinfo=UTC)
    server = HubServer(
        user="alice", name="gpu1", started=now - timedelta(hours=5), last_activity=now - timedelta(hours=3),
        url="/user/alice/gpu1/", user_options={"partition": "long", "req_ngpus": "1", "cpus": "4", "mem": "16G"},
        state={"job_id": "77", "job_status": "RUNNING cn-b002"},
    )
    obs = Observation(server=server, state=State.DETACHED, at=now, last_activity=now - timedelta(hours=3),
                      detached_since=now - timedelta(hours=3, minutes=13), detail="no browser connected, kernels idle")
    dec = Decision(Action.WARN, "window closed 3h13m ago", stop_at=now + timedelta(minutes=42))
    ctx = context_from(notice_context(obs, dec, now), public_url="https://hub.example.org/", tz="America/Toronto",
                       now=now, hub_name="Mila", keep_url="https://hub.example.org/services/reaper/keep/x")
    assert ctx.server_url == "https://hub.example.org/user/alice/gpu1/"
    assert ctx.control_panel_url == "https://hub.example.org/hub/home"
    assert (ctx.job_id, ctx.node, ctx.partition, ctx.gpus, ctx.cpus, ctx.mem) == ("77", "cn-b002", "long", 1, 4, "16 GB")
    assert ctx.idle_for == "3h13m" and ctx.stop_at == now + timedelta(minutes=42)
    t = render(NoticeKind.WARNING, ctx).text
    assert 'Your server "gpu1" on Mila' in t and "Slurm job 77 on node cn-b002, partition long" in t
    assert "4 CPUs, 1 GPU, 16 GB" in t and "14:00 EST, Wed 25 Nov (in 42 min)" in t


# --- the first 8 lines: what, why, when, what it holds, stop now, keep it ---------------------------
#
# A "line" (reaper.notify.render.notice_lines): in plain text a line of the body; in HTML a rendered
# text line of the body (one per block element: h2, p, div, li, tr, br ...; a link as "text <href>";
# the <title> is not one); in Slack a line of the message's mrkdwn text, then one per button
# ("[label] <url>"). Blank lines do not count.

_CTX = sample_context()
_STOP = "14:00 EST, Wed 25 Nov"  # the sample's stop_at in the hub's zone
_NOW = "13:18 EST, Wed 25 Nov"  # the sample's now (and stopped_at)
_HOLDS = "4 CPUs, 1 GPU, 16 GB"
_CP = _CTX.control_panel_url
_KEEP = _CTX.keep_url
_IDLE = {
    "what": ['server "gpu1"', "Example JupyterHub"],
    "why": ["window closed 3h13m ago"],
    "when": [_STOP, "in 42 min"],
    "holds": [_HOLDS],
    "stop now": [_CP, "Stop My Server"],
    "keep": [_KEEP, "2h"],
}
SIX_ANSWERS: dict[NoticeKind, dict[str, list[str]]] = {
    NoticeKind.WARNING: _IDLE,
    NoticeKind.REMINDER: {**_IDLE, "what": [*_IDLE["what"], "Reminder (notice 2)"]},
    NoticeKind.FINAL: {**_IDLE, "what": [*_IDLE["what"], "Final notice"]},
    NoticeKind.STOPPED: {
        "what": ["stopped your server \"gpu1\"", "Example JupyterHub"],
        "why": ["window closed 3h13m ago"],
        "when": [f"stopped at {_NOW}"],
        "holds": [_HOLDS],
        "stop now": ["already stopped"],
        "keep": ["Start it again", _CP],
    },
    NoticeKind.WALLTIME: {
        "what": ['server "gpu1"', "Example JupyterHub", "time limit"],
        "why": ["batch job with a time limit"],
        "when": ["09:18 EST, Thu 26 Nov", "in 20h"],
        "holds": [_HOLDS],
        "stop now": [_CP, "Stop My Server"],
        "keep": ["cannot be extended", "start a new server"],
    },
    NoticeKind.ORPHAN: {
        "what": ["leftover batch job", "4242", "Example JupyterHub"],
        "why": ["no server of Example JupyterHub owned it"],
        "when": [f"cancelled at {_NOW}"],
        "holds": [_HOLDS],
        "stop now": ["already cancelled"],
        "keep": ["nothing to keep", _CP],
    },
}


@pytest.mark.parametrize("channel", ["text", "html", "slack"])
@pytest.mark.parametrize("kind", list(NoticeKind))
def test_the_first_8_lines_answer_what_why_when_holds_stop_now_and_keep(kind: NoticeKind, channel: str) -> None:
    from reaper.notify.render import FIRST_LINES, notice_lines

    lines = notice_lines(render(kind, _CTX), channel)
    head = "\n".join(lines[:FIRST_LINES])
    missing = {answer: [m for m in marks if m not in head] for answer, marks in SIX_ANSWERS[kind].items()}
    assert not {a: m for a, m in missing.items() if m}, f"{kind}/{channel}: first {FIRST_LINES} lines:\n{head}"
    # and the details come after: where it runs is not crowding the answers out
    assert "cn-a001" in "\n".join(lines[FIRST_LINES - 2:]) or kind is NoticeKind.ORPHAN


@pytest.mark.parametrize("channel", ["text", "html", "slack"])
@pytest.mark.parametrize("kind", list(NoticeKind))
def test_the_answers_keep_their_place_when_the_facts_are_unknown(kind: NoticeKind, channel: str) -> None:
    from reaper.notify.render import FIRST_LINES, _sparse_context, notice_lines

    head = notice_lines(render(kind, _sparse_context()), channel)[:FIRST_LINES]
    labels = ["Why:", "When:", "Stop it now", "Holds:" if kind in SIX_ANSWERS and kind not in (
        NoticeKind.STOPPED, NoticeKind.ORPHAN) else "Held:"]
    for label in labels:
        assert any(label in ln for ln in head), (kind, channel, label, head)
    assert any(("Keep it" in ln or "Start it again" in ln) for ln in head), head
    assert "None" not in "\n".join(head)


def test_the_slack_keep_button_is_the_signed_link_and_walltime_offers_none() -> None:
    r = render(NoticeKind.WARNING, _CTX)
    [actions] = [b for b in r.slack_blocks if b["type"] == "actions"]
    assert actions["elements"][0]["url"] == _KEEP and actions["elements"][0]["text"]["text"] == "Keep running for 2h"
    w = render(NoticeKind.WALLTIME, _CTX)
    [wa] = [b for b in w.slack_blocks if b["type"] == "actions"]
    assert all(e["action_id"] != "reaper-keep" for e in wa["elements"])


def test_html_lines_are_the_rendered_text_with_links_and_without_the_title() -> None:
    from reaper.notify.render import RenderedNotice, notice_lines

    html = ('<html><head><title>T</title><style>p{}</style></head><body><h2>Head</h2><p>a <a href="u">b</a>'
            '<br>c</p><table><tr><td>x</td><td>y</td></tr></table>tail</body></html>')
    r = RenderedNotice("warning", "", "", html, "", [])
    assert notice_lines(r, "html") == ["Head", "a b <u>", "c", "x y", "tail"]


def test_a_named_servers_display_name_is_shown() -> None:
    from reaper.store import NoticeContext

    now = datetime(2026, 11, 25, 18, 18, tzinfo=UTC)
    notice = NoticeContext(user="alice", server="gpu1", started=now, display_name="My GPU box")
    ctx = context_from(notice, public_url="https://hub.example.org", tz="UTC", now=now)
    r = render(NoticeKind.WARNING, ctx)
    assert r.text.startswith('Your server "gpu1" (My GPU box) on JupyterHub')
    assert 'server "gpu1" (My GPU box)' in r.subject and 'server "gpu1" (My GPU box)' in r.slack_text
    # the same name as the server's, or none: the server's name alone
    for same in ("gpu1", None, ""):
        ctx = context_from(NoticeContext(user="alice", server="gpu1", started=now, display_name=same),
                           public_url="https://h", tz="UTC", now=now)
        assert render(NoticeKind.WARNING, ctx).text.startswith('Your server "gpu1" on')


def test_what_it_holds_comes_from_the_batch_job_and_the_options_fill_in() -> None:
    """Our spawner's options have memory but no CPUs ("holding 4 GB" before); the sweep's batch
    job knows CPUs, memory and GPUs."""
    from reaper.store import NoticeContext

    now = datetime(2026, 11, 25, 18, 18, tzinfo=UTC)
    opts = {"partition": "gpu", "memory": "4G", "runtime": "8:00:00"}
    before = context_from(NoticeContext(user="a", started=now, user_options=opts), public_url="https://h", tz="UTC",
                          now=now)
    assert before.resources() == "4 GB"
    held = context_from(NoticeContext(user="a", started=now, user_options=opts,
                                      held={"cpus": 8, "mem_mb": 16384, "gpus": 2}),
                        public_url="https://h", tz="UTC", now=now)
    assert held.resources() == "8 CPUs, 2 GPUs, 16 GB"
    assert "Holds: 8 CPUs, 2 GPUs, 16 GB." in render(NoticeKind.WARNING, held).text
    partial = context_from(NoticeContext(user="a", started=now, user_options=opts, held={"cpus": 2}),
                           public_url="https://h", tz="UTC", now=now)
    assert partial.resources() == "2 CPUs, 4 GB"
