"""Settings: one strict object; a wrong value stops start-up with one line that says what to do."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from quantum_trader.errors import ConfigError
from quantum_trader.keys import StreamNames
from quantum_trader.settings import LIVE_CONFIRMATION, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if (name.startswith("QT_") and not name.startswith("QT_TEST_")) or name.startswith("EXECUTION_RESULT"):
            monkeypatch.delenv(name)


def test_seed_names_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXECUTION_RESULT_STREAM", "custom:results")
    monkeypatch.setenv("EXECUTION_RESULT_STREAM_LEGACY", "legacy:results")
    settings = load_settings()
    assert settings.streams.result == "custom:results"
    assert settings.streams.result_legacy == "legacy:results"
    assert settings.streams.intent == "quantum:stream:trade.intent"
    assert settings.streams.execution_group == "quantum:group:execution:trade.intent"
    assert settings.dedup_window_s == 300
    assert settings.mode == "paper"


def test_testnet_daily_limit_defaults_to_the_seeds_million(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QT_MODE", "testnet")
    assert load_settings().effective_daily_limit == 1_000_000
    monkeypatch.setenv("QT_DAILY_LIMIT", "5")
    assert load_settings().effective_daily_limit == 5


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("QT_MAX_INTENT_AGE_S", "abc", "QT_MAX_INTENT_AGE_S='abc'"),
        ("QT_MAX_INTENT_AGE_S", "-1", "greater than 0"),
        ("QT_MODE", "yolo", "'paper', 'testnet' or 'live'"),
        ("QT_REDIS_URL", "http://x", "redis://, rediss:// or unix://"),
        ("QT_DEDUP_FIELDS", "symbol", "allowed: correlation_id, trace_id, msg_id"),
        ("QT_PAPER_BALANCES", "USDT:5", "ASSET=AMOUNT"),
        ("QT_MAX_NOTINAL", "5", "did you mean QT_MAX_NOTIONAL"),
        ("QT_WEB_TOKEN", "s3cr3t-s3cr3t-s3cr3t", "QT_WEB_TOKEN is a secret: it is read from the secrets file"),
        ("QT_ALERT_URLS", "tgram://1:zq9zq/2", "QT_ALERT_URLS is a secret: it is read from the secrets file"),
    ],
)
def test_bad_values_name_the_variable_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    assert "s3cr3t" not in message
    assert "zq9zq" not in message


def test_live_mode_refuses_without_confirmation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QT_MODE", "live")
    with pytest.raises(ConfigError, match="QT_LIVE_CONFIRM"):
        load_settings()
    monkeypatch.setenv("QT_LIVE_CONFIRM", LIVE_CONFIRMATION)
    assert load_settings().effective_daily_limit == 100


def test_env_file_in_systemd_syntax(tmp_path: Path) -> None:
    env_file = tmp_path / "core_gates.env"
    env_file.write_text(
        "# quantum trader\nQT_MAX_NOTIONAL=2500.50\nQT_SYMBOL_ALLOWLIST=ethusdt, BTCUSDT\n"
        'EXECUTION_RESULT_STREAM="quantum:stream:execution.result.v2"\nQT_PAPER_BALANCES=USDT=10,ETH=1.5\n'
    )
    settings = load_settings(env_file)
    assert settings.max_notional == Decimal("2500.50")
    assert settings.symbol_allowlist == ["ETHUSDT", "BTCUSDT"]
    assert settings.result_stream == "quantum:stream:execution.result.v2"
    assert settings.paper_balances == {"USDT": Decimal(10), "ETH": Decimal("1.5")}


@pytest.mark.parametrize(
    ("line", "complaint"),
    [("; old comment", "start comments with '#'"), ("QT_SYMBOL_ALLOWLIST=ETHUSDT,\\", "continued with a backslash")],
)
def test_systemd_forms_the_reader_would_misread_are_refused_with_the_line(
    tmp_path: Path, line: str, complaint: str
) -> None:
    env_file = tmp_path / "quantum-trader.env"
    env_file.write_text(f"# fine\nQT_MAX_NOTIONAL=10\n{line}\nBTCUSDT\n")
    with pytest.raises(ConfigError, match=f"line 3: .*{complaint}"):
        load_settings(env_file)


def test_missing_or_unreadable_env_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.env")


def test_cli_prints_one_line_and_exits_2_on_bad_config() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_BATCH_SIZE": "lots"}
    done = subprocess.run([sys.executable, "-m", "quantum_trader", "status"], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: invalid configuration: QT_BATCH_SIZE='lots'")
    assert "Traceback" not in done.stderr


def test_every_command_option_read_from_the_environment_is_a_known_variable() -> None:
    from typing import Any

    import typer

    from quantum_trader.cli import app
    from quantum_trader.settings import COMMAND_VARIABLES

    def envvars(command: Any) -> set[str]:
        found = {p.envvar for p in command.params if isinstance(p.envvar, str)}
        for sub in getattr(command, "commands", {}).values():
            found |= envvars(sub)
        return found

    declared = envvars(typer.main.get_command(app))
    assert "QT_DURATION" in declared
    assert declared == set(COMMAND_VARIABLES)


def test_command_variables_are_not_refused_as_unknown_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QT_DURATION", "5")
    monkeypatch.setenv("QT_STAGES", "router,execution")
    assert load_settings().mode == "paper"


def test_a_dedup_window_shorter_than_an_intent_may_live_is_refused_naming_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An exact replay 3 s later would pass the 60 s age check after a 2 s window forgot the first.
    monkeypatch.setenv("QT_DEDUP_WINDOW_S", "2")
    monkeypatch.setenv("QT_MAX_INTENT_AGE_S", "60")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "QT_DEDUP_WINDOW_S=2" in message
    assert "QT_MAX_INTENT_AGE_S=60" in message
    assert "set QT_DEDUP_WINDOW_S=65 or more" in message  # 60 s of age + 5 s a timestamp may run ahead
    assert "\n" not in message
    monkeypatch.setenv("QT_DEDUP_WINDOW_S", "65")
    assert load_settings().dedup_window_s == 65


def test_an_unset_dedup_window_follows_a_longer_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings()
    assert (defaults.dedup_window_s, defaults.max_intent_age_s, defaults.clock_skew_s) == (300, 60, 5)
    monkeypatch.setenv("QT_MAX_INTENT_AGE_S", "3600")
    assert load_settings().dedup_window_s == 3605


def test_a_redis_password_never_shows_in_a_repr_or_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from quantum_trader.settings import Settings

    settings = Settings(redis_url="redis://u:pw-7f3a@h/0")
    assert "pw-7f3a" not in repr(settings)
    assert "redis://u:***@h/0" in repr(settings)
    assert settings.redis_url == "redis://u:pw-7f3a@h/0"  # code still connects with the real URL
    copied = settings.model_copy(update={"redis_url": "redis://:pw-copy@h/0"})
    assert "pw-copy" not in repr(copied)
    # A mistyped scheme is still a URL with a password in it.
    with pytest.raises(ValidationError) as raw:
        Settings(redis_url="http://:pw-typo@h:6379/0")
    assert "pw-typo" not in str(raw.value)
    monkeypatch.setenv("QT_REDIS_URL", "http://:pw-typo@h:6379/0")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "pw-typo" not in str(caught.value)
    assert "QT_REDIS_URL='http://:***@h:6379/0'" in str(caught.value)


def test_the_cli_never_prints_a_password_from_a_mistyped_url() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {
        "QT_REDIS_URL": "http://:pw-on-stderr@127.0.0.1:1/0"
    }
    done = subprocess.run([sys.executable, "-m", "quantum_trader", "status"], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: invalid configuration: QT_REDIS_URL='http://:***@127.0.0.1:1/0'")
    assert "pw-on-stderr" not in done.stdout + done.stderr


def test_command_variables_in_an_env_file_are_not_taken_for_settings(tmp_path: Path) -> None:
    env = tmp_path / "qt.env"
    env.write_text("QT_STAGES=router\nQT_DURATION=5\nQT_BATCH_SIZE=10\n")
    assert load_settings(env).batch_size == 10


def test_the_environment_wins_over_the_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / "qt.env"
    env.write_text("QT_BATCH_SIZE=10\nQT_RESULT_STREAM=from:file\nQT_BLOCK_MS=250\n")
    monkeypatch.setenv("QT_BATCH_SIZE", "20")
    monkeypatch.setenv("EXECUTION_RESULT_STREAM", "from:environment")
    settings = load_settings(env)
    assert (settings.batch_size, settings.result_stream, settings.block_ms) == (20, "from:environment", 250)


def test_an_unknown_field_is_refused_in_python_too() -> None:
    with pytest.raises(ValidationError, match="bogus"):
        Settings(bogus=1)  # type: ignore[call-arg]


def test_a_changed_copy_is_validated_like_the_original() -> None:
    settings = load_settings()
    with pytest.raises(ConfigError, match="QT_BATCH_SIZE=0"):
        settings.with_changes(batch_size=0)
    with pytest.raises(ConfigError, match="bogus"):
        settings.with_changes(bogus=1)
    # A derived default is derived again: the dedup window follows a longer intent age.
    longer = settings.with_changes(max_intent_age_s=1000)
    assert longer.dedup_window_s >= 1000 + longer.clock_skew_s
    assert settings.dedup_window_s == 300  # the original is untouched


def test_every_stream_name_has_one_default() -> None:
    defaults = StreamNames()
    assert load_settings().streams == defaults
