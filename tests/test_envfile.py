"""The systemd EnvironmentFile reader shared by the settings and the secrets file: pure, no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantum_trader.envfile import parse_env, read_env_file
from quantum_trader.errors import ConfigError


def test_names_and_values_in_file_order() -> None:
    text = "# settings\n\nQT_B=2\nQT_A=1\n   \n\tQT_C = 3 \n"
    values = parse_env(text, "env file x.env")
    assert values == {"QT_B": "2", "QT_A": "1", "QT_C": "3"}
    assert list(values) == ["QT_B", "QT_A", "QT_C"]


def test_export_prefix_is_dropped() -> None:
    assert parse_env("export A=1\nexport   B=2\nexported=3\n", "f") == {"A": "1", "B": "2", "exported": "3"}


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("A='x y'", "x y"),
        ('A="x y"', "x y"),
        ("A=''", ""),
        ('A=""', ""),
        ("A=", ""),
        ("A='", "'"),  # one quote is not a pair
        ("A='x\"", "'x\""),  # nor are two different ones
        ('A="it\'s"', "it's"),
        ("A=\"'inner'\"", "'inner'"),  # only the outer pair goes
        ('A="a\\nb"', "a\\nb"),  # nothing inside is unescaped
        ("A= 'padded' ", "padded"),
        ("A=plain=with=equals", "plain=with=equals"),
        ("A=value # not a comment", "value # not a comment"),
        ("A=#hash", "#hash"),
        ("A=semi;colon", "semi;colon"),
    ],
)
def test_quotes_and_values_as_written(line: str, value: str) -> None:
    assert parse_env(line + "\n", "f") == {"A": value}


def test_comments_blank_lines_and_lines_without_a_value_are_skipped() -> None:
    text = "# A=1\n   # indented comment\n\nJUSTANAME\n#\\\nB=2"  # a comment may end with a backslash
    assert parse_env(text, "f") == {"B": "2"}


def test_the_last_of_a_repeated_name_wins() -> None:
    assert parse_env("A=1\nB=2\nA=3\n", "f") == {"A": "3", "B": "2"}


def test_windows_line_ends_are_lines_too() -> None:
    assert parse_env("A=1\r\nB='2'\r\n", "f") == {"A": "1", "B": "2"}


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("; old comment", "start comments with '#', not ';'"),
        ("  ;A=1", "start comments with '#', not ';'"),
        ("QT_SYMBOL_ALLOWLIST=ETHUSDT,\\", "a value continued with a backslash; put it on one line"),
        ("A=x \\   ", "a value continued with a backslash"),
    ],
)
def test_forms_other_readers_would_misread_are_refused_with_file_and_line(line: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_env(f"# fine\nA=1\n{line}\nB=2\n", "env file /etc/qt.env")
    assert str(caught.value).startswith("env file /etc/qt.env, line 3: ")
    assert complaint in str(caught.value)


def test_bytes_that_are_not_utf8_are_refused_with_the_line_and_column() -> None:
    with pytest.raises(ConfigError, match=r"^secrets file s.env, line 2: byte 0xe9 at column 8 is not UTF-8"):
        parse_env(b"A=1\nB=caf\xc3\xa9\xe9\n", "secrets file s.env")


def test_utf8_values_are_kept() -> None:
    assert parse_env("A=café\n".encode(), "f") == {"A": "café"}


def test_read_env_file_strips_quotes_comments_and_export(tmp_path: Path) -> None:
    path = tmp_path / "s.env"
    path.write_text("# c\nexport A='x y'\nB=\"z\"\n\nC=plain=with=equals\n", encoding="utf-8")
    assert read_env_file(path) == {"A": "x y", "B": "z", "C": "plain=with=equals"}


def test_read_env_file_names_the_file_and_lets_open_errors_through(tmp_path: Path) -> None:
    path = tmp_path / "s.env"
    path.write_bytes(b"\xff=1\n")
    with pytest.raises(ConfigError, match=rf"^secrets file {path}, line 1: byte 0xff at column 1"):
        read_env_file(path, "secrets file")
    path.write_text("ok=1\n;x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^env file {path}, line 2: "):
        read_env_file(path)
    with pytest.raises(FileNotFoundError):
        read_env_file(tmp_path / "missing.env")
