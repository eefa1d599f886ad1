"""LayerSettings: the compact encoding the C side parses, from_config, layer_env."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mirrord.config import load_config
from mirrord.layer import LayerSettings, layer_env, library_path, posix_regex
from tests.layer._daemon import LayerDaemon
from tests.layer.conftest import Runner


def test_default_settings_encode_one_key_per_line() -> None:
    text = LayerSettings().encode()
    lines = text.splitlines()
    assert lines[0] == "v=1"
    assert "fs_mode=read" in lines
    assert all("=" in line for line in lines)
    assert text.endswith("\n")


def test_lists_repeat_their_key() -> None:
    text = LayerSettings(
        read_only=("a", "b"),
        skip_processes=("x", "y"),
        port_mapping=((8080, 80),),
        outgoing_filter_mode="local",
        outgoing_filter=("udp://10.0.0.0/8:53", "[::1]:80", "db.svc"),
        dns_filter_mode="remote",
        dns_filter=("db.svc:5432",),
    ).encode()
    assert "read_only=a\nread_only=b\n" in text
    assert "skip_process=x\nskip_process=y\n" in text
    assert "port_mapping=8080 80\n" in text
    assert "outgoing_filter=udp 10.0.0.0/8 53\n" in text
    assert "outgoing_filter=any ::1 80\n" in text
    assert "outgoing_filter=any db.svc 0\n" in text
    assert "dns_filter=db.svc 5432\n" in text


def test_rust_shorthands_become_posix_classes() -> None:
    assert posix_regex(r"^/data/\d+\.json$") == r"^/data/[0-9]+\.json$"
    assert posix_regex(r"\w\s[\d]") == r"[[:alnum:]_][[:space:]][\d]"
    with pytest.raises(ValueError, match="inline flags"):
        posix_regex(r"(?s)foo")
    with pytest.raises(ValueError, match="lookaround"):
        posix_regex(r"^/x(?!y)")


def test_what_matching_case_insensitively_for_a_yes_or_no_makes_equivalent() -> None:
    # the layer matches case-insensitively (as mirrord does), so a leading (?i) is a no-op
    assert posix_regex(r"(?i)^/App/.*\.JSON$") == r"^/App/.*\.JSON$"
    # whether a string matches does not depend on laziness
    assert posix_regex(r"a.*?b+?c??d{1,2}?") == r"a.*b+c?d{1,2}"
    assert posix_regex(r"\*?[+?]") == r"\*?[+?]"  # an escaped '*' and a bracket keep their '?'


def test_line_breaks_are_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        LayerSettings(skip_processes=("a\nfs_mode=local",)).encode()


def test_from_config_reads_the_config_model(tmp_path: Path) -> None:
    cfg_file = tmp_path / "mirrord.json"
    cfg_file.write_text(
        """{
  "feature": {
    "fs": {"mode": "write", "read_only": ["^/app/ro"], "not_found": "^/secret",
           "readonly_file_buffer": 0},
    "network": {
      "incoming": {"mode": "steal", "port_mapping": [[8080, 80]], "ignore_ports": [9999]},
      "outgoing": {"filter": {"local": ["127.0.0.1:5432"]}, "ignore_localhost": true},
      "dns": {"enabled": true, "filter": {"remote": ["db.svc"]}}
    },
    "hostname": false
  },
  "skip_processes": ["gdb"],
  "skip_build_tools": false
}"""
    )
    cfg = load_config(cfg_file, env={}, cwd=tmp_path)
    s = LayerSettings.from_config(cfg)
    assert s.fs_mode == "write"
    assert s.read_ahead == 0 and "read_ahead=0\n" in s.encode()
    assert s.read_only == ("^/app/ro",) and s.not_found == ("^/secret",)
    assert s.incoming == "steal" and s.port_mapping == ((8080, 80),) and s.ignore_ports == (9999,)
    assert s.outgoing_filter_mode == "local" and s.outgoing_filter == ("127.0.0.1:5432",)
    assert s.ignore_localhost
    assert s.dns_filter_mode == "remote" and s.dns_filter == ("db.svc",)
    assert not s.hostname and s.skip_processes == ("gdb",) and not s.skip_build_tools
    # the JSON dump that crosses to the daemon gives the same settings
    assert LayerSettings.from_config(cfg.model_dump(mode="json")) == s


def test_ipv6_is_on_unless_the_file_or_mirrords_variable_turns_it_off(tmp_path: Path) -> None:
    assert LayerSettings.from_config(load_config(None, env={}, cwd=tmp_path)).ipv6
    assert "ipv6=1\n" in LayerSettings().encode()
    off = load_config(None, env={"MIRRORD_ENABLE_IPV6": "false"}, cwd=tmp_path)
    assert "ipv6=0\n" in LayerSettings.from_config(off).encode()
    cfg_file = tmp_path / "mirrord.json"
    cfg_file.write_text('{"feature": {"network": {"ipv6": false}}}')
    assert not LayerSettings.from_config(load_config(cfg_file, env={}, cwd=tmp_path)).ipv6


def test_layer_env_names_the_library_and_appends_to_a_preload() -> None:
    env = layer_env(
        socket_path="/run/x.sock", session_id="abc", settings=LayerSettings(), debug=True
    )
    assert env["LD_PRELOAD"] == str(library_path())
    assert env["MIRRORD_LAYER_SOCKET"] == "/run/x.sock"
    assert env["MIRRORD_SESSION"] == "abc"
    assert env["UV_USE_IO_URING"] == "0"
    assert env["MIRRORD_LAYER_DEBUG"] == "1"
    assert env["MIRRORD_LAYER_CONFIG"] == LayerSettings().encode()
    env = layer_env(
        socket_path="s", session_id="a", settings=LayerSettings(), existing_preload="/x.so"
    )
    assert env["LD_PRELOAD"] == f"/x.so:{library_path()}"


def test_a_malformed_config_leaves_the_layer_inactive(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORD_")}
    env.update(
        layer_env(socket_path=str(tmp_path / "none"), session_id="s", settings=LayerSettings())
    )
    env["MIRRORD_LAYER_CONFIG"] = "this line has no equals sign\n"
    out = subprocess.run(
        ["cat", "/app/test.txt"], env=env, capture_output=True, timeout=30, check=False
    )
    assert b"No such file or directory" in out.stderr  # local, not EIO from a remote attempt


def test_the_c_side_parses_what_python_encodes(run: Runner, daemon: LayerDaemon) -> None:
    """Every key reaches the C side: a regex list, the fs mode, a skip list and filters."""
    settings = LayerSettings(
        fs_mode="localwithoverrides",
        read_only=(r"^/app/config/\w+\.yaml$",),
        outgoing_filter_mode="remote",
        outgoing_filter=("tcp://192.0.2.0/25:80",),
        dns_filter_mode="remote",
        dns_filter=("db.svc.cluster.local",),
        skip_processes=("head",),
        hostname=False,
    )
    code = """
import socket
print(open('/app/config/settings.yaml').read(), end='')
print(socket.getaddrinfo('db.svc.cluster.local', 80, type=socket.SOCK_STREAM)[0][4][0])
print(socket.create_connection(('192.0.2.55', 80), timeout=10).recv(100).decode(), end='')
s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
try:
    socket.create_connection(('127.0.0.1', port), timeout=5)  # not in the filter: local
except OSError as e:
    print('local', type(e).__name__)
"""
    out = run.py(code, settings=settings).stdout.decode().splitlines()
    assert out[:3] == ["debug: true", "192.0.2.77", "hello 192.0.2.55:80"]
    assert out[3] == "local ConnectionRefusedError"
    assert run(["head", "-c", "3", "/etc/passwd"], settings=settings).stdout == b"roo"
    assert daemon.kinds() == [
        "FileFetch",  # open, stat and the whole small file in one round trip
        "DnsLookup",
        "LayerConnect",
    ]


def test_fs_mappings_become_numbered_groups_for_the_c_side() -> None:
    from mirrord.layer._settings import posix_mapping

    assert posix_mapping(r"^/data/(.*)$", "/app/$1") == (r"^/data/(.*)$", "/app/${1}")
    # named groups (both spellings) are numbered; an unknown name or number becomes empty
    assert posix_mapping(r"^/cfg/(?<env>[^/]+)/(?P<f>.*)$", "/app/${env}/$f$7$nope$$") == (
        r"^/cfg/([^/]+)/(.*)$",
        "/app/${1}/${2}$$",
    )
    # a non-capturing group captures in POSIX: the numbers after it shift
    assert posix_mapping(r"^/x(?:a|b)/(\d+)$", "/y/$1") == (r"^/x(a|b)/([0-9]+)$", "/y/${2}")
    line = LayerSettings(fs_mapping=((r"^/data/(.*)$", "/app/$1"),)).encode()
    assert "fs_map=^/data/(.*)$\t/app/${1}\n" in line
