"""Messages that say what happened: a stalled agent is a timeout (not "environment read
(EIO)"), a lost agent always comes with a reason, and a configuration the layer cannot hold is
refused before any agent starts, naming the limit. The scripted agent stands for the agent."""

from __future__ import annotations

import errno

import anyio
import pytest

from mirrord.layer import LayerSettings, LayerSettingsTooLarge
from mirrord.protocol import messages as m
from tests.daemon.test_daemon_logic import Harness

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_stalled_agent_is_a_timeout_not_an_eio(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session opened while its (shared) agent is stopped: the environment request gets no
    answer. The user was told "the agent could not read the target's environment: environment
    read (EIO)", the daemon's own channel close taken for the agent's answer."""
    monkeypatch.setattr("mirrord.daemon._env.ENV_REQUEST_TIMEOUT", 1.0)
    await harness.session()  # the agent is up and shared
    harness.agent().stalled = True  # SIGSTOP
    control = await harness.control()
    with anyio.fail_after(30):
        reply = await control.call("create_session", target="scripted/a", config={})
    assert not reply["ok"]
    message = reply["error"]["message"]
    assert "did not answer" in message and "within 1 s" in message, message
    assert "environment read" not in message and "EIO" not in message, message


async def test_the_agent_was_lost_always_says_why(harness: Harness) -> None:
    """An agent killed with the daemon's bytes unread: the daemon's read fails with
    ECONNRESET, and the event said "the agent was lost: the agent stream broke: " (anyio's
    BrokenResourceError has no text of its own)."""
    control, session, _ = await harness.session()
    peer = await harness.layer(session, pid=7001)
    agent = harness.agent()
    agent.stalled = True
    await peer.send(m.FileOpen(request_id=1, path=b"/x", flags=0))  # read, never answered
    await anyio.sleep(0.3)  # the agent is now stopped before its next read
    for rid in range(2, 5):  # requests the stopped agent never reads
        await peer.send(m.FileOpen(request_id=rid, path=b"/x" * 2000, flags=0))
    await anyio.sleep(0.3)
    agent.kill()
    with anyio.fail_after(10):
        while harness.daemon.sessions[session].state != "agent_lost":
            await anyio.sleep(0.01)
    pending = await peer.recv()
    assert isinstance(pending, m.ErrorReply) and pending.errno == errno.EIO
    status = await control.call("status")
    lost = [e for e in control.events if e.get("event") == "agent_lost"]
    assert lost, control.events
    message = str(lost[0]["message"])
    assert message.startswith("the agent was lost: ")
    reason = message.removeprefix("the agent was lost: ")
    assert not reason.rstrip().endswith(":"), message
    assert "reset" in reason.lower() or "closed" in reason.lower(), message
    assert status["result"]["sessions"][0]["reason"] == reason


def _too_many_patterns() -> dict[str, object]:
    return {"feature": {"fs": {"read_only": [f"^/data/{i}/" for i in range(200)]}}}


def _too_long_a_pattern() -> dict[str, object]:
    return {"feature": {"fs": {"read_only": ["^/" + "a" * 5000]}}}


def _too_large_for_the_environment() -> dict[str, object]:
    patterns = [f"^/{i:03d}/" + "b" * 1500 for i in range(100)]  # 100 x 1.5 KB: 150 KB
    return {"feature": {"fs": {"read_only": patterns}}}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (_too_many_patterns(), "feature.fs.read_only has 200 entries; the layer takes at most 128"),
        (_too_long_a_pattern(), "the layer reads at most 4095 bytes per entry"),
        (_too_large_for_the_environment(), "at most 131072 bytes per environment string"),
    ],
    ids=["list", "line", "environment"],
)
async def test_a_configuration_the_layer_cannot_hold_is_refused_before_the_session(
    harness: Harness, config: dict[str, object], expected: str
) -> None:
    """It used to start the agent and the session; then the layer dropped patterns beyond
    its list size, stayed inactive on a long line, or the command failed with E2BIG."""
    control = await harness.control()
    reply = await control.call("create_session", target="scripted/a", config=config)
    assert not reply["ok"]
    assert reply["error"]["code"] == "config_error", reply
    assert expected in reply["error"]["message"], reply["error"]["message"]
    assert harness.backend.started == []  # no agent was started for it
    assert not harness.daemon.sessions


def test_settings_within_the_limits_still_encode() -> None:
    fits = LayerSettings(read_only=tuple(f"^/data/{i}/" for i in range(128)))
    assert fits.encode().count("read_only=") == 128
    with pytest.raises(LayerSettingsTooLarge):
        LayerSettings(read_only=tuple(f"^/data/{i}/" for i in range(129))).encode()
