"""The command line end to end: verbs exist, --help shows defaults, bad input is one line and exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from nas4dyn.cli.main import VERBS, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas4dyn", *args], capture_output=True, text=True, timeout=300)


def test_version_and_spaces_listing():
    out = run_cli("--version")
    assert out.returncode == 0 and "nas4dyn" in out.stdout
    out = run_cli("spaces")
    assert out.returncode == 0
    for name in ("fmnist", "mbv3", "tiny"):
        assert name in out.stdout


def test_spaces_show_names_dynamic_mechanisms():
    out = run_cli("spaces", "show", "fmnist")
    assert out.returncode == 0
    for word in ("early exits", "global gater", "skip", "kernels [3, 5, 7]"):
        assert word in out.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ("spaces", "show", "no-such-space"),
        ("no-such-verb",),
        ("spaces", "show"),
    ],
)
def test_bad_input_is_one_line_exit_2(args):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_debug_shows_traceback():
    out = run_cli("--debug", "spaces", "show", "no-such-space")
    assert out.returncode == 2 and "Traceback" in out.stderr


@pytest.mark.parametrize("argv", [
    ["train", "--space", "tiny", "--data", "synthetic", "--out", "{file}/run"],
    ["profile", "--space", "tiny", "--out", "{file}/lut.json"],
    ["analyze", "gates", "--model", "nowhere", "--data", "synthetic", "--out", "{file}/report"],
])
def test_output_under_a_file_is_refused_before_any_work(argv, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("")
    assert main([a.format(file=file) for a in argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--out" in lines[0] and "is a file" in lines[0], lines
    assert file.read_text() == ""
