"""config.yaml loading: the shipped file is valid, and every kind of mistake names file, key and line."""

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from reaper.config import ConfigError, load_settings, parse_duration, parse_settings

ROOT = Path(__file__).resolve().parents[2]


def err(text, env=None):
    with pytest.raises(ConfigError) as e:
        parse_settings(text, "site.yaml", env=env or {})
    return str(e.value)


def test_shipped_config_yaml_is_valid_and_has_the_documented_rules():
    s = load_settings(ROOT / "config.yaml", env={})
    assert s.defaults.detached.stop_after == timedelta(hours=3)
    assert [r.name for r in s.rules] == ["staff", "gpu"]
    gpu = s.resolved_rules()[1]
    assert gpu.max_age == timedelta(days=2) and gpu.min_notice == timedelta(minutes=30)


@pytest.mark.parametrize(
    "text,seconds",
    [("90m", 5400), ("2h", 7200), ("7d", 604800), ("1h30m", 5400), ("45s", 45), (30, 30), ("2w", 1209600)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("bad", ["-5m", "5 minutes", "h", "", True, [1]])
def test_bad_durations_rejected(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_unknown_key_names_file_path_and_line():
    msg = err("defaults:\n  detached:\n    warn_after: 1h\n    stop_afterr: 3h\n")
    assert msg.startswith("site.yaml:4: defaults.detached.stop_afterr: unknown key")


def test_wrong_type_names_line():
    msg = err("safety:\n  max_stops_per_sweep: lots\n")
    assert "site.yaml:2: safety.max_stops_per_sweep:" in msg


def test_stop_before_warn_is_an_error_on_the_rule_line():
    text = "rules:\n  - name: x\n    match: {users: [bob]}\n    detached:\n      warn_after: 2h\n      stop_after: 1h\n"
    msg = err(text)
    assert "site.yaml:6: rules[0].detached.stop_after: stop_after (1h) must be later than warn_after (2h)" in msg


def test_rule_inheriting_warn_after_can_still_be_inconsistent():
    # defaults warn at 1h; a rule that only lowers stop_after to 45m stops before it warns
    msg = err("rules:\n  - name: x\n    match: {users: [bob]}\n    detached: {stop_after: 45m}\n")
    assert "rules[0].detached.stop_after" in msg and "warn_after (1h)" in msg


def test_negative_duration_is_an_error():
    assert "site.yaml:2: sweep_every: a duration cannot be negative" in err("\nsweep_every: -5m\n")


def test_a_duration_too_long_for_python_is_a_config_error_not_a_crash():
    assert "site.yaml:2: sweep_every: not a usable duration" in err("\nsweep_every: 9999999999999999d\n")


def test_yaml_syntax_error_has_line():
    assert err("defaults:\n  detached: [1h\n").startswith("site.yaml:")


def test_secret_literal_refused_and_env_substituted():
    msg = err("hub:\n  api_token: abc123\n")
    assert "site.yaml:2: hub.api_token: secrets must come from the environment" in msg
    assert "abc123" not in msg
    s = parse_settings("hub:\n  api_token: ${HUB_TOKEN}\n", env={"HUB_TOKEN": "tok"})
    assert s.hub.effective_token() == "tok"


def test_missing_env_var_is_an_error():
    msg = err("hub:\n  api_token: ${NOPE}\n")
    assert "site.yaml:2: hub.api_token: environment variable NOPE is not set" in msg


def test_catch_all_rule_before_others_can_never_let_them_match():
    msg = err("rules:\n  - name: all\n    exempt: true\n  - name: later\n    match: {users: [x]}\n")
    assert "site.yaml:2: rules[0].match:" in msg and "can never match (later)" in msg


def test_empty_match_list_can_never_match():
    assert "rules[0].match.groups: an empty list can never match" in err(
        "rules:\n  - name: a\n    match: {groups: []}\n"
    )


def test_unknown_timezone():
    assert "hub.timezone" in err("hub:\n  timezone: Mars/Olympus\n")


def test_duplicate_rule_names():
    assert "duplicate rule name" in err(
        "rules:\n  - name: a\n    match: {users: [x]}\n  - name: a\n    match: {users: [y]}\n"
    )


def test_several_problems_are_all_reported():
    msg = err("sweep_every: nope\nsafety:\n  bogus: 1\n")
    assert "site.yaml:1: sweep_every" in msg and "site.yaml:3: safety.bogus" in msg


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "reaper.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)


def test_check_config_cli_prints_effective_policy_and_exits_zero(tmp_path):
    # on a Slurm hub: `squeue` runs (a stand-in here), so batch.system auto is slurm and the
    # shipped slurm: and orphans: sections apply (without one: tests/unit/test_batch_system.py)
    squeue = tmp_path / "squeue"
    squeue.write_text('#!/bin/sh\necho "slurm 22.05.8"\n')
    squeue.chmod(0o755)
    r = _cli("check-config", str(ROOT / "config.yaml"), env={**os.environ, "PATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "warn_after: 1h" in r.stdout and "rules:" in r.stdout
    assert "# batch system: slurm (batch.system: auto; squeue runs)" in r.stdout


def test_check_config_cli_exits_nonzero_with_file_key_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  detached:\n    stop_after: banana\n")
    r = _cli("check-config", str(bad))
    assert r.returncode != 0
    assert f"{bad}:3: defaults.detached.stop_after:" in r.stderr


def test_repr_of_settings_never_shows_a_secret():
    s = parse_settings(
        'hub: {api_token: "${T}"}\nnotify: {email: {password: "${P}"}}\n', env={"T": "TOK-123", "P": "PW-456"}
    )
    assert s.hub.effective_token() == "TOK-123"
    for text in (repr(s), str(s), repr(s.notify.email)):
        assert "TOK-123" not in text and "PW-456" not in text


def test_web_section_is_typed_and_its_errors_name_key_and_line():
    s = parse_settings("web:\n  admin_group: ops\n  keep: {max_extension: 90m, choices: [30m, 90m]}\n", env={})
    assert s.web.admin_group == "ops" and s.web.keep.max_extension == timedelta(minutes=90)
    assert s.keep_policy().offered() == [timedelta(minutes=30), timedelta(minutes=90)]
    assert parse_settings("web: {prefix: services/x}\n", env={}).web.prefix == "/services/x/"
    assert "site.yaml:3: web.keep: keep.choices: 2h is longer than keep.max_extension (1h)" in err(
        "web:\n  admin_group: ops\n  keep: {max_extension: 1h, choices: [2h]}\n")
    msg = err("web:\n  colour: red\n  listen: '8123'\n")
    assert "site.yaml:2: web.colour: unknown key" in msg  # every problem, not just the first
    assert "site.yaml:3: web.listen: web.listen must look like http://127.0.0.1:8123" in msg


def test_batch_section_is_typed_and_its_errors_name_key_and_line():
    s = parse_settings("batch:\n  system: Slurm\n  commands: {squeue: /opt/bin/squeue}\n"
                       "  env: {SLURM_CONF: /x, SLURM_DEBUG: 1}\n  timeout: 7\n", env={})
    assert s.batch.system == "slurm" and s.batch.command("squeue") == "/opt/bin/squeue"
    assert s.batch.command("scancel") == "scancel" and s.batch.env == {"SLURM_CONF": "/x", "SLURM_DEBUG": "1"}
    assert s.batch.timeout == 7 and parse_settings("", env={}).batch.system == "auto"
    assert parse_settings("batch: {system: }\n", env={}).batch.system == "none"  # empty: none, as always
    assert err("batch:\n  systm: slurm\n").startswith("site.yaml:2: batch.systm: unknown key")
    assert "site.yaml:2: batch.system: Input should be 'auto', 'slurm', 'pbs', 'torque' or 'none'" in err(
        "batch:\n  system: lsf\n")
    assert "site.yaml:3: batch.commands.qstat: not a command of slurm (its commands: squeue, scancel, sstat)" in err(
        "batch:\n  system: slurm\n  commands: {qstat: /x}\n")
    assert "site.yaml:2: batch.timeout:" in err("batch:\n  timeout: 0\n")
    assert "site.yaml:2: batch.timezone: unknown time zone 'Mars/X'" in err("batch:\n  timezone: Mars/X\n")
    assert "site.yaml:2: batch.pbs_format:" in err("batch:\n  pbs_format: yaml\n")


def test_rules_become_the_cores_frozen_types():
    from dataclasses import FrozenInstanceError

    from reaper.core.rules import Match, ResolvedRule, Thresholds

    s = parse_settings(
        "rules:\n  - name: gpu\n    match: {groups: [ml], user_options: {partition: [gpu, 'a100*']}, min_gpus: 1}\n"
        "    detached: {stop_after: 2h}\n", env={})
    [gpu] = s.resolved_rules()
    assert isinstance(gpu, ResolvedRule) and isinstance(gpu.match, Match) and isinstance(gpu.detached, Thresholds)
    assert gpu.match == Match(groups=("ml",), user_options={"partition": ("gpu", "a100*")}, min_gpus=1)
    assert gpu.detached == Thresholds(warn_after=timedelta(hours=1), stop_after=timedelta(hours=2))  # merged
    assert s.default_rule().match.is_catch_all() and not gpu.match.is_catch_all()
    with pytest.raises(FrozenInstanceError):
        gpu.name = "other"  # type: ignore[misc]


def test_the_working_keys_are_typed_converted_to_the_cores_rule_and_shipped_with_their_defaults():
    shipped = load_settings(ROOT / "config.yaml", env={})
    assert shipped.probe.working_cpu == 0.02 and shipped.probe.companion is True
    assert shipped.working.protect_idle == timedelta(hours=2)
    assert shipped.default_rule().working == "protect"
    s = parse_settings("probe: {working_cpu: '5%', companion: false}\nworking: {protect_idle: 30m}\n"
                       "rules: [{name: batch, match: {groups: [hpc]}, working: count}, {name: other, match: {users: [x]}}]\n",
                       env={})
    assert s.probe.working_cpu == 0.05 and not s.probe.companion
    batch, other = s.resolved_rules()
    assert batch.working == "count" and other.working == "protect"  # unset: from defaults
    assert batch.protect_idle == other.protect_idle == s.default_rule().protect_idle == timedelta(minutes=30)
    assert parse_settings("probe: {working_cpu: 0.5}", env={}).probe.working_cpu == 0.5
    assert parse_settings("probe: {working_cpu: 150%}", env={}).probe.working_cpu == 1.5


@pytest.mark.parametrize("bad", ["0%", "-2%", "two", "true", "[1]", "0"])
def test_a_bad_working_cpu_names_its_key_and_line(bad):
    msg = err(f"sweep_every: 5m\nprobe:\n  working_cpu: {bad}\n")
    assert "site.yaml:3" in msg and "probe.working_cpu" in msg


def test_a_bad_working_mode_or_protect_idle_names_its_key():
    assert "defaults.working" in err("defaults:\n  working: forever\n")
    assert "working.protect_idle" in err("working:\n  protect_idle: -5m\n")
