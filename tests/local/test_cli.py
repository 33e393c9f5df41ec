"""The command line: help everywhere, one-line usage errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorafleet.cli import main

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

SUBCOMMANDS = ["serve", "gateway", "operator", "kube-api", "up", "down", "status", "models"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-P", "-m", "lorafleet", *args], capture_output=True, text=True, timeout=60)


def test_top_level_help_lists_every_subcommand() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: lorafleet" in capsys.readouterr().out


def test_unknown_flag_exits_2_with_one_line() -> None:
    result = run_cli("models", "list", "--no-such-flag")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "unrecognized arguments: --no-such-flag" in lines[0]


def test_unknown_model_name_exits_2() -> None:
    result = run_cli("models", "fetch", "no-such-model")
    assert result.returncode == 2
    assert "unknown model 'no-such-model'" in result.stderr


def test_models_list_shows_default_model(smollm2_path) -> None:
    result = run_cli("models", "list")
    assert result.returncode == 0
    assert "smollm2" in result.stdout and "ready" in result.stdout and str(smollm2_path) in result.stdout


def test_gateway_and_operator_never_import_torch() -> None:
    code = (
        "import sys, lorafleet, lorafleet.cli, lorafleet.gateway, lorafleet.operator, lorafleet.model_store;"
        "lorafleet.cli.build_parser();"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_gateway_needs_replicas_or_a_service() -> None:
    result = run_cli("gateway")
    assert result.returncode == 2 and "one of the arguments --replica --service is required" in result.stderr
    result = run_cli("gateway", "--service", "no-namespace")
    assert result.returncode == 2 and "--service must be NAMESPACE/NAME" in result.stderr
