"""``quantum-trader alerts test``: one test message to every alert URL, and which received it."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import typer

from quantum_trader.cli.common import JSON_OPT, configured, console
from quantum_trader.errors import ConfigError

alerts_app = typer.Typer(help="Alerts through Apprise (QT_ALERT_URLS in the secrets file).", no_args_is_help=True)


@alerts_app.command("test")
def test_command(as_json: bool = JSON_OPT) -> None:  # noqa: PT028 (a command, not a test)
    """Send one test message to every URL of QT_ALERT_URLS; exit 1 when any did not receive it."""
    cfg = configured()
    from quantum_trader.alerts import alert_urls, deliver, trial_message  # Apprise: only when an alert is sent

    urls = alert_urls(cfg)
    if not urls:
        raise ConfigError(
            f"no alert URLs: add QT_ALERT_URLS=<Apprise URLs, comma or space separated> to the secrets file "
            f"({cfg.secrets_file or 'set QT_SECRETS_FILE'}); they are not read from the environment"
        )
    message = trial_message(cfg)
    with ThreadPoolExecutor(max_workers=min(8, len(urls)), thread_name_prefix="alerts-test") as pool:
        done = list(pool.map(lambda url: deliver(url, message, cfg.alert_timeout_s), urls))
    if as_json:
        rows = [
            {"url": url.shown, "delivered": d.ok, "seconds": round(d.seconds, 3), "reason": d.reason}
            for url, d in zip(urls, done, strict=True)
        ]
        print(json.dumps(rows))
    else:
        for url, d in zip(urls, done, strict=True):
            outcome = "delivered" if d.ok else f"FAILED: {d.reason}"
            console.print(f"{url.shown}  {outcome} ({d.seconds:.2f} s)", markup=False, highlight=False)
    raise typer.Exit(0 if all(d.ok for d in done) else 1)


def register(app: typer.Typer) -> None:
    """Add this family's commands to ``app``."""
    app.add_typer(alerts_app, name="alerts")
