"""``migrator guest`` argument handling: bad input gets a one-line error naming it."""

from __future__ import annotations

import argparse

import pytest

from migrator.core.errors import GuestError
from migrator.cli import guest as cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="migrator guest")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_and_values():
    args = parse("--size", "64M", "--dirty-rate", "2500", "--pattern", "hot:0.05:0.9", "--seed", "0x10")
    assert (args.size, args.dirty_rate, str(args.pattern), args.seed) == (64 << 20, 2500.0, "hot:0.05:0.9", 16)
    args = parse("--size", "1G", "--dirty-rate", "unlimited")
    assert args.dirty_rate is None and args.fill is None and not args.restore


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "12X"], "size '12X'"),
        (["--size", "1M", "--dirty-rate", "fast"], "'fast': expected page writes per second"),
        (["--size", "1M", "--dirty-rate", "-5"], "'-5': expected page writes per second"),
        (["--size", "1M", "--pattern", "hot:2:0.5"], "need 0 < FRACTION < 1"),
        (["--size", "1M", "--seed", "-1"], "'-1': expected an integer"),
        (["--size", "1M", "--fill", "zeros"], "invalid choice: 'zeros'"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_restore_refuses_workload_settings():
    with pytest.raises(GuestError, match="--seed cannot be used with --restore"):
        cli.run(parse("--size", "1M", "--restore", "--seed", "3"))


def test_size_is_required_without_a_trace_to_size_by():
    with pytest.raises(GuestError, match="--size is required"):
        cli.run(parse())
