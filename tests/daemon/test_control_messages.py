"""The control API's messages (`mirrord.daemon._control`) without sockets: each request, answer
and event survives its encoding, bad lines are the sender's error, and an error answer comes
back as the exception class its code names."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mirrord.daemon import (
    AgentLostEvent,
    ClosedEvent,
    CloseSession,
    ConfigRefused,
    ControlError,
    CreateSession,
    DaemonDisconnected,
    DaemonError,
    DaemonStopping,
    ListSessions,
    ProcessEvent,
    ProgressEvent,
    SessionNotFound,
    SessionStatus,
    Shutdown,
    Status,
    WaitSession,
    WarningEvent,
)
from mirrord.daemon._control import (
    ControlRequest,
    SessionCreated,
    SessionIdle,
    decode_event,
    decode_reply,
    encode_answer,
    encode_error,
    encode_event,
    encode_request,
    read_line,
    request_from,
)
from mirrord.daemon._exceptions import BadRequest, DaemonBug, error_for_code

REQUESTS: list[ControlRequest[Any]] = [
    Status(),
    ListSessions(),
    SessionStatus(session="s1"),
    CreateSession(
        config_request={"config_file": None, "flags": {"target": "pid/1"}, "env": {}, "cwd": "/"},
        client_pid=42,
        cwd="/tmp",
        label="run x",
        debug=True,
    ),
    CreateSession(target="pid/7", config={"feature": {}}, client_pid=1),
    CloseSession(session="s1", reason="done"),
    WaitSession(session="s1", wait_timeout=0.0),
    WaitSession(session="s1"),
    Shutdown(),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_reads_back_as_itself(request_: ControlRequest[Any]) -> None:
    line = encode_request(7, request_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    rid, fields = read_line(line.rstrip(b"\n"))
    assert rid == 7
    assert fields["op"] == request_.op
    assert request_from(fields) == request_


def test_answers_read_back_through_their_request() -> None:
    created = SessionCreated(
        session="s1",
        env={"A": "1"},
        unset=["B"],
        agent="local:1",
        agent_description="agent of pid/1",
        layer_socket="/run/layer.sock",
        warnings=["w"],
    )
    reply = json.loads(encode_answer(3, created))
    assert reply == {"id": 3, "ok": True, "result": created.to_json()}
    assert decode_reply(CreateSession(target="pid/1"), reply) == created
    idle = json.loads(encode_answer("x", SessionIdle(registered=True, state="open")))
    assert decode_reply(WaitSession(session="s1"), idle) == SessionIdle(
        registered=True, state="open"
    )


_CREATED = SessionCreated(session="s1", env={"A": "1"}).to_json()


@pytest.mark.parametrize(
    ("request_", "result", "error", "says"),
    [
        (CreateSession(target="pid/1"), {}, KeyError, "create_session answer has no 'session'"),
        (CreateSession(target="pid/1"), {"env": {"A": "1"}}, KeyError, "no 'session'"),
        (CreateSession(target="pid/1"), {"session": "s1"}, KeyError, "no 'env'"),
        (CreateSession(target="pid/1"), {**_CREATED, "session": ""}, TypeError, "empty session"),
        (CreateSession(target="pid/1"), {**_CREATED, "session": 7}, TypeError, "session=7"),
        (CreateSession(target="pid/1"), {**_CREATED, "env": ["A"]}, TypeError, "env="),
        (CreateSession(target="pid/1"), {**_CREATED, "env": {"A": 1}}, TypeError, "env\\['A'\\]=1"),
        (CreateSession(target="pid/1"), {**_CREATED, "unset": "B"}, TypeError, "unset='B'"),
        (CreateSession(target="pid/1"), {**_CREATED, "unset": [None]}, TypeError, "unset\\[0\\]"),
        (CreateSession(target="pid/1"), {**_CREATED, "agent": None}, TypeError, "agent=None"),
        (CreateSession(target="pid/1"), {**_CREATED, "warnings": [3]}, TypeError, "warnings"),
        (CreateSession(target="pid/1"), "s1", TypeError, "not a JSON object"),
        (Status(), ["up"], TypeError, "status answer is not a JSON object"),
        (ListSessions(), {}, KeyError, "no 'sessions'"),
        (ListSessions(), {"sessions": [1]}, TypeError, "session is not a JSON object"),
        (SessionStatus(session="s1"), None, TypeError, "session answer is not"),
        (CloseSession(session="s1"), 0, TypeError, "close_session answer is not"),
        (WaitSession(session="s1"), {}, KeyError, "no 'idle'"),
        (
            WaitSession(session="s1"),
            {"idle": 1, "registered": True, "state": ""},
            TypeError,
            "idle=1",
        ),
        (Shutdown(), {}, KeyError, "shutdown answer has no 'pid'"),
        (Shutdown(), {"pid": True}, TypeError, "pid=True"),
        (Shutdown(), {"pid": "12"}, TypeError, "pid='12'"),
    ],
)
def test_an_answer_without_its_fields_is_a_decode_error(
    request_: ControlRequest[Any], result: Any, error: type[Exception], says: str
) -> None:
    """A required field missing or of the wrong type is a KeyError/TypeError (the CLI ends it
    as an internal error, traceback saved), never an answer with a field filled in."""
    with pytest.raises(error, match=says):
        decode_reply(request_, {"id": 1, "ok": True, "result": result})


@pytest.mark.parametrize(
    ("reply", "error", "says"),
    [
        ({"id": 1}, KeyError, "no 'ok'"),
        ({"id": 1, "ok": 1, "result": {}}, TypeError, "ok=1"),
        ({"id": 1, "ok": True}, KeyError, "no 'result'"),
        ({"id": 1, "ok": False}, KeyError, "no 'error'"),
        ({"id": 1, "ok": False, "error": {"message": "m"}}, KeyError, "no 'code'"),
        ({"id": 1, "ok": False, "error": {"code": "internal"}}, KeyError, "no 'message'"),
        ({"id": 1, "ok": False, "error": {"code": 5, "message": "m"}}, TypeError, "code=5"),
        (
            {"id": 1, "ok": False, "error": {"code": "x", "message": "m", "errors": "e"}},
            TypeError,
            "errors='e'",
        ),
    ],
)
def test_a_reply_without_its_fields_is_a_decode_error(
    reply: dict[str, Any], error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        decode_reply(Status(), reply)


@pytest.mark.parametrize(
    ("obj", "error", "says"),
    [
        ({"event": "progress"}, KeyError, "progress event has no 'message'"),
        ({"event": "progress", "message": 3}, TypeError, "message=3"),
        ({"event": "warning", "message": "careful"}, KeyError, "no 'session'"),
        ({"event": "closed", "session": 1, "message": "bye"}, TypeError, "session=1"),
        ({"event": "agent_lost", "session": "s1"}, KeyError, "no 'message'"),
        ({"event": "process", "session": "s1", "registered": True}, KeyError, "no 'pid'"),
        ({"event": "process", "session": "s1", "pid": "9", "registered": True}, TypeError, "pid"),
        ({"event": "process", "session": "s1", "pid": 9}, KeyError, "no 'registered'"),
        ({"event": "process", "session": "s1", "pid": 9, "registered": 1}, TypeError, "registered"),
    ],
)
def test_an_event_without_its_fields_is_a_decode_error(
    obj: dict[str, Any], error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        decode_event(obj)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ConfigRefused("bad config", ["a: wrong", "b: wrong"]), ConfigRefused),
        (SessionNotFound("s9"), SessionNotFound),
        (DaemonStopping(), DaemonStopping),
        (DaemonBug("it broke"), DaemonBug),
        (BadRequest("no"), BadRequest),
    ],
)
def test_an_error_answer_raises_the_class_its_code_names(
    error: DaemonError, kind: type[DaemonError]
) -> None:
    reply = json.loads(encode_error(5, error))
    assert reply["ok"] is False and reply["error"]["code"] == error.code
    with pytest.raises(kind) as raised:
        decode_reply(Status(), reply)
    assert type(raised.value) is kind
    assert raised.value.message == error.message
    assert raised.value.errors == error.errors


def test_an_unknown_error_code_is_a_control_error() -> None:
    exc = error_for_code("from_the_future", "something new")
    assert type(exc) is ControlError and exc.message == "something new"
    assert type(error_for_code("disconnected", "gone")) is DaemonDisconnected


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b"\xff\xfe", "UTF-8"),
        (b"{not json", "one JSON object per line"),
        (b"[1, 2]", "is a JSON object"),
        (b'{"id": true, "op": "status"}', "id is a number or a string"),
        (b"[" * 100_000, "nests too deeply"),
    ],
)
def test_an_unreadable_line_is_a_bad_request(line: bytes, says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        read_line(line)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"op": "frobnicate"}, "unknown control op 'frobnicate'"),
        ({"op": "create_session", "config_request": {}, "client_pid": "abc"}, "client_pid"),
        ({"op": "create_session", "config": {}}, "needs a target"),
        ({"op": "create_session", "target": "pid/1", "config": [1]}, "config must be"),
        ({"op": "wait_session", "session": "s", "wait_timeout": "soon"}, "wait_timeout"),
    ],
)
def test_a_request_with_bad_fields_is_a_bad_request(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        request_from(fields)


def test_a_negative_wait_timeout_means_do_not_wait() -> None:
    request = request_from({"op": "wait_session", "session": "s", "wait_timeout": -3})
    assert request == WaitSession(session="s", wait_timeout=0.0)


def test_events_read_back_as_themselves() -> None:
    events = [
        ProgressEvent(message="starting"),
        WarningEvent(session="s1", message="careful"),
        AgentLostEvent(session="s1", message="the agent was lost: gone"),
        ClosedEvent(session="s1", message="bye"),
        ProcessEvent(session="s1", pid=12, registered=True),
    ]
    for event in events:
        obj = json.loads(encode_event(event))
        assert decode_event(obj) == event
    assert json.loads(encode_event(events[0])) == {"event": "progress", "message": "starting"}
    assert decode_event({"event": "from_the_future"}) is None
