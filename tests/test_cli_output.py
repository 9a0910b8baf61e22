"""The CLI's text layer: virsh's table/info/size formats, its option grammar, help, start-up.

Where virsh's output is the reference, it is recorded in tests/data/virsh (virsh 9.0).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from virtstore.cli.main import commands, main
from virtstore.cli.output import info_block, parse_scaled, pretty_size, table
from virtstore.cli.parser import parse
from virtstore.cli.xmlbuild import pool_xml, volume_xml
from virtstore.errors import InvalidArgument

VIRSH = Path(__file__).parent / "data" / "virsh"


def _cells(line: str) -> list[str]:
    return re.split(r" {2,}", line.strip())


@pytest.mark.parametrize("recording", ["pool-list-all.txt", "pool-list-details.txt",
                                       "vol-list-details.txt", "secret-list.txt"])
def test_table_matches_virsh_layout(recording: str) -> None:
    text = (VIRSH / recording).read_text()
    lines = text.rstrip("\n").split("\n")
    headers, rows = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    assert table(headers, rows) == "\n".join(lines)


def test_quiet_table_has_no_header() -> None:
    recorded = (VIRSH / "pool-list-quiet.txt").read_text().rstrip("\n")
    full = (VIRSH / "pool-list-all.txt").read_text().rstrip("\n").split("\n")
    rows = [_cells(line) for line in full[2:]]
    assert table(_cells(full[0]), rows, header=False) == recorded


def test_empty_table_is_header_and_rule() -> None:
    assert table(["Name", "State", "Autostart"], []) == (
        " Name   State   Autostart\n---------------------------")


def test_table_aligns_wide_characters() -> None:
    out = table(["Name", "Path"], [["日本", "/a"], ["ab", "/b"]]).split("\n")
    assert out[2] == " 日本   /a"
    assert out[3] == " ab     /b"


def test_info_block_matches_virsh() -> None:
    recorded = (VIRSH / "vol-info.txt").read_text().rstrip("\n")
    pairs = [(line.split(":", 1)[0], line.split(":", 1)[1].strip())
             for line in recorded.split("\n")]
    assert info_block(pairs) == recorded


@pytest.mark.parametrize(("n", "text"), [
    (0, "0.00 B"), (1023, "1023.00 B"), (1024, "1.00 KiB"), (200704, "196.00 KiB"),
    (512 * 2**20, "512.00 MiB"), (5 * 2**30, "5.00 GiB"), (270553174016, "251.97 GiB"),
    (3 * 2**40, "3.00 TiB"),
])
def test_pretty_size(n: int, text: str) -> None:
    assert pretty_size(n) == text


@pytest.mark.parametrize(("text", "n"), [
    ("100", 100), ("10G", 10 * 2**30), ("10g", 10 * 2**30), ("512M", 512 * 2**20),
    ("1T", 2**40), ("10GB", 10 * 10**9), ("5KiB", 5 * 1024), ("7b", 7), ("3bytes", 3),
    ("0", 0),
])
def test_parse_scaled(text: str, n: int) -> None:
    assert parse_scaled(text) == n


@pytest.mark.parametrize("text", ["-5G", "1.5G", "", "G", "10X", "10 GiBs", "99999999999E"])
def test_parse_scaled_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^Malformed size"):
        parse_scaled(text)


# -- the option grammar ----------------------------------------------------------------

CMDS = commands()


def test_positional_words_fill_string_options_in_order() -> None:
    args = parse(CMDS["vol-info"], ["a.img", "p1", "--bytes"])
    assert (args.get("vol"), args.get("pool"), args.flag("bytes")) == ("a.img", "p1", True)
    args = parse(CMDS["pool-define-as"], ["q", "dir", "h", "/p"])
    assert args.get("source-host") == "h"
    assert args.get("source-path") == "/p"


def test_named_options_any_order_and_equals_form() -> None:
    args = parse(CMDS["vol-info"], ["--pool=p1", "--vol", "a.img"])
    assert (args.get("vol"), args.get("pool")) == ("a.img", "p1")


def test_double_dash_makes_data_of_what_follows() -> None:
    args = parse(CMDS["vol-create-as"], ["p", "v", "--", "--odd"])
    assert args.get("capacity") == "--odd"


def test_negative_size_is_data_not_an_option() -> None:
    assert parse(CMDS["vol-create-as"], ["p", "v", "-5G"]).get("capacity") == "-5G"


@pytest.mark.parametrize(("argv", "message"), [
    (["p1", "extra"], "unexpected data 'extra'"),
    (["p1", "--bogus"], "command 'pool-info' doesn't support option --bogus"),
    ([], "command 'pool-info' requires <pool> option"),
    (["p1", "--bytes=yes"], "option --bytes does not take a value"),
])
def test_parse_errors_use_virsh_wording(argv: list[str], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse(CMDS["pool-info"], argv)
    assert str(err.value) == message


def test_help_for_a_command_is_laid_out_as_virsh() -> None:
    recorded = (VIRSH / "help-pool-info.txt").read_text()
    ours = subprocess.run([sys.executable, "-m", "virtstore.cli.main", "help", "pool-info"],
                          capture_output=True, text=True, check=True).stdout
    # We add --json to info and listing commands; otherwise the text is virsh's.
    expected = recorded.replace("[--bytes]", "[--bytes] [--json]").replace(
        "    --bytes          Return pool info in bytes\n",
        "    --bytes          Return pool info in bytes\n"
        "    --json           print a JSON document (sizes in bytes) instead of text\n")
    assert ours == expected


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    for name in ("pool-list", "pool-define-as", "vol-create-as", "vol-pool", "secret-list",
                 "pool-import-libvirt"):
        assert re.search(rf"^    {re.escape(name)} +\S", out, re.M), name


def test_command_help_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vol-create-as", "--help"]) == 0
    assert "vol-create-as <pool> <name> <capacity> [--allocation <string>]" in (
        capsys.readouterr().out)


def test_unknown_command_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pool-frobnicate"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: unknown command: 'pool-frobnicate'\n"
    assert captured.out == ""


def test_unsupported_uri_is_one_line_error(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    assert main(["-c", "qemu:///system", "--root", str(tmp_path), "pool-list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unsupported connection URI 'qemu:///system'")
    assert err.count("\n") == 1


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from virtstore import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"{__version__}\n"


# -- XML from arguments ------------------------------------------------------------------

def test_pool_xml_escapes_what_virsh_does_not() -> None:
    xml = pool_xml("a<&>'b", "dir", target="/tmp/x&y")
    assert "<name>a&lt;&amp;&gt;'b</name>" in xml
    assert "<path>/tmp/x&amp;y</path>" in xml
    from lxml import etree

    assert etree.fromstring(xml).findtext("name") == "a<&>'b"


def test_attribute_quotes_are_escaped() -> None:
    xml = pool_xml("q", "netfs", source_host="h'o\"st")
    assert "<host name='h&apos;o&quot;st'/>" in xml


def test_volume_xml_matches_virsh() -> None:
    assert volume_xml("z", 10**10, allocation=5120) == (
        VIRSH / "vol-create-as-units.xml").read_text().rstrip("\n") + "\n"


# -- start-up cost ------------------------------------------------------------------------

HEAVY = ("lxml", "rich", "sqlite3", "_sqlite3", "json", "virtstore.engine", "virtstore.api",
         "dataclasses", "argparse")


def _imported_modules(*argv: str) -> set[str]:
    env = dict(os.environ, VIRTSTORE_ROOT="/nonexistent-virtstore-root")
    code = "import sys; from virtstore.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *argv],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-500:]
    return {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
            if line.startswith("import time:")}


@pytest.mark.parametrize("argv", [("--help",), ("help",), ("pool-define-as", "q", "dir",
                                                              "--target", "/t", "--help")])
def test_help_imports_nothing_heavy(argv: tuple[str, ...]) -> None:
    mods = _imported_modules(*argv)
    assert "virtstore.cli.main" in mods
    assert not [m for m in mods if m.split(".")[0] in HEAVY or m in HEAVY]


# -- *-dumpxml --xpath ------------------------------------------------------------------

@pytest.mark.parametrize(("expr", "wrap", "recording"), [
    ("/pool/target", False, "xpath-target.txt"),
    ("//path", True, "xpath-path-wrap.txt"),
    ("/pool/@type", False, "xpath-attr.txt"),
    ("/pool/@type", True, "xpath-attr-wrap.txt"),
    ("//name/text()", False, "xpath-text.txt"),
    ("/pool/*[self::name or self::uuid]", False, "xpath-two.txt"),
])
def test_xpath_output_matches_virsh(expr: str, wrap: bool, recording: str) -> None:
    from virtstore.cli.xmlbuild import xpath_dump

    doc = (VIRSH / "pool-dumpxml.xml").read_text()
    # virsh's recording ends with its closing empty line
    assert xpath_dump(doc, expr, wrap=wrap) + "\n" == (VIRSH / recording).read_text()


@pytest.mark.parametrize("expr", ["string(/pool/name)", "count(//path)", "/pool[", ""])
def test_xpath_refuses_what_virsh_refuses(expr: str) -> None:
    from virtstore.cli.xmlbuild import xpath_dump

    with pytest.raises(InvalidArgument, match=r"^Incorrect xpath"):
        xpath_dump((VIRSH / "pool-dumpxml.xml").read_text(), expr)


def test_xpath_is_not_positional() -> None:
    with pytest.raises(InvalidArgument, match="unexpected data '/pool/name'"):
        parse(CMDS["pool-dumpxml"], ["p1", "/pool/name"])
