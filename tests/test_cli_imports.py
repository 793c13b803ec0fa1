"""The command line starts light: importing it loads no torch (the commands import their libraries when they run),
so `regproxy --help` is instant and `--engine ray`'s driver reaches Ray without it."""

import os
import subprocess
import sys

HEAVY = ("torch", "timm", "torchvision")


def _python(*args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter with this environment (PYTHONPATH included), as a user's shell starts one."""
    return subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=120)


def test_importing_the_cli_imports_no_torch():
    loaded = _python("-c", "import sys, regproxy_cli.cli.app\n"
                           f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "", f"importing regproxy_cli.cli.app loads {loaded.stdout.strip()}"


def test_help_in_a_fresh_process_lists_every_command():
    from regproxy_cli.cli.app import app

    result = _python("-m", "regproxy_cli", "--help")
    assert result.returncode == 0, result.stderr
    commands = [c.name for c in app.registered_commands] + [g.name for g in app.registered_groups]
    missing = [name for name in commands if f" {name} " not in result.stdout]
    assert len(commands) > 10 and not missing, missing
