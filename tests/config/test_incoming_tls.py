"""The config of HTTPS under a filtered steal: `tls_steal` needs both files, is reported when
it cannot apply, `tls_delivery` is mirrord's key and round-trips to the daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrord.config import MirrordConfig, config_warnings, resolve_config


def incoming(**keys: object) -> dict[str, object]:
    return {"target": "pid/1", "feature": {"network": {"incoming": keys}}}


def test_tls_steal_and_delivery_round_trip_to_the_daemon() -> None:
    cfg = MirrordConfig.model_validate(
        incoming(
            mode="steal",
            http_filter={"header_filter": "^x-user: me$", "ports": [8443]},
            tls_steal={"cert": "certs/tls.crt", "key": "certs/tls.key"},
            tls_delivery={"protocol": "tcp", "trust_roots": "ca.pem"},
        )
    )
    net = cfg.feature.network.incoming
    assert net.tls_steal.is_set and net.tls_steal.cert == "certs/tls.crt"
    assert net.tls_delivery.protocol == "tcp" and net.tls_delivery.trust_roots == ["ca.pem"]
    assert MirrordConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert config_warnings(cfg) == []
    default = MirrordConfig.model_validate(incoming(mode="steal"))
    assert not default.feature.network.incoming.tls_steal.is_set
    assert default.feature.network.incoming.tls_delivery.protocol == "tls"


def test_a_certificate_without_its_key_is_refused() -> None:
    with pytest.raises(ValueError, match="set both cert and key"):
        MirrordConfig.model_validate(incoming(mode="steal", tls_steal={"cert": "tls.crt"}))
    with pytest.raises(ValueError, match="protocol"):
        MirrordConfig.model_validate(incoming(tls_delivery={"protocol": "https"}))


def test_tls_steal_without_a_filtered_steal_is_reported() -> None:
    cfg = MirrordConfig.model_validate(
        incoming(mode="steal", tls_steal={"cert": "tls.crt", "key": "tls.key"})
    )
    (warning,) = config_warnings(cfg)
    assert "tls_steal is ignored" in warning


def test_mirrords_older_https_delivery_is_ignored_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "mirrord.json"
    path.write_text('{"feature": {"network": {"incoming": {"https_delivery": {}}}}}')
    resolved = resolve_config(path, env={})
    assert any("https_delivery" in w for w in resolved.warnings)
