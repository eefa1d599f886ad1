"""The daemon's part of an HTTPS filtered steal: `tls_steal`'s and `tls_delivery`'s files read
on this machine at session start (relative to the session's working directory) and checked,
with errors that name the key, the file and what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from mirrord.config import MirrordConfig
from mirrord.daemon._exceptions import ConfigRefused
from mirrord.daemon._incoming_tls import agent_tls_warnings, subscribe_tls
from mirrord.protocol import messages as m


@pytest.fixture
def files(tmp_path: Path) -> Path:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf = ca.issue_cert("pod.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    return tmp_path


def config(**incoming: object) -> MirrordConfig:
    keys = {"mode": "steal", "http_filter": {"header_filter": "^x-user: me$"}, **incoming}
    return MirrordConfig.model_validate({"feature": {"network": {"incoming": keys}}})


def test_the_files_become_subscribe_tls(files: Path) -> None:
    cfg = config(
        tls_steal={"cert": "tls.crt", "key": "tls.key"},
        tls_delivery={
            "trust_roots": ["ca.pem"],
            "server_name": "me.test",
            "server_cert": "tls.crt",
        },
    )
    wire = subscribe_tls(cfg, str(files))
    assert wire is not None
    assert wire["cert_pem"] == (files / "tls.crt").read_text()
    assert wire["key_pem"] == (files / "tls.key").read_text()
    assert wire["delivery"] == {
        "protocol": "tls",
        "server_name": "me.test",
        "trust_roots_pem": (files / "ca.pem").read_text(),
        "server_cert_pem": (files / "tls.crt").read_text(),
    }
    m.Subscribe(request_id=1, port=8443, mode="steal", tls=wire)  # a valid wire message


def test_nothing_without_tls_steal_or_a_filtered_steal(files: Path) -> None:
    assert subscribe_tls(config(), str(files)) is None
    pair = {"cert": "tls.crt", "key": "tls.key"}
    unfiltered = MirrordConfig.model_validate(
        {"feature": {"network": {"incoming": {"mode": "steal", "tls_steal": pair}}}}
    )
    assert subscribe_tls(unfiltered, str(files)) is None


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"tls_steal": {"cert": "nope.crt", "key": "tls.key"}},
            "cannot read feature.network.incoming.tls_steal.cert",
        ),
        (
            {"tls_steal": {"cert": "tls.key", "key": "tls.key"}},
            "tls_steal: the certificate is not PEM",
        ),
        (
            {
                "tls_steal": {"cert": "tls.crt", "key": "tls.key"},
                "tls_delivery": {"trust_roots": "tls.key"},
            },
            "tls_delivery.trust_roots: the trust roots cannot be loaded",
        ),
        (
            {
                "tls_steal": {"cert": "tls.crt", "key": "tls.key"},
                "tls_delivery": {"server_cert": "tls.key"},
            },
            "is not one PEM certificate",
        ),
    ],
)
def test_bad_files_stop_the_session_with_what_to_fix(
    files: Path, keys: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigRefused, match=message):
        subscribe_tls(config(**keys), str(files))


def test_an_older_agent_is_warned_about() -> None:
    wire = {"cert_pem": "c", "key_pem": "k"}
    assert agent_tls_warnings(wire, [m.FEATURE_INCOMING_TLS]) == []
    assert agent_tls_warnings(None, []) == []
    (warning,) = agent_tls_warnings(wire, [])
    assert "does not terminate TLS" in warning
