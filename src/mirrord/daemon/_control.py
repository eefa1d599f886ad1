"""The control API between the CLI and `mirrordd`: its requests, answers and events as types.

Owns: one class per request (`Status`, `CreateSession`, ...), per answer (`SessionCreated`,
`SessionIdle`, ...) and per event (`ProgressEvent`, `AgentLostEvent`, ...), each a frozen,
slotted, keyword-only dataclass (one that adds no field to its base is a plain subclass with
`__slots__ = ()`: it inherits the base's generated methods, which `@dataclass` would generate
again, ~0.4 ms each on every `mirrord run`); and the one encoding of them as JSON lines: the
daemon reads a request with `read_line` + `request_from` and writes with `encode_answer`,
`encode_error`, `encode_event`; the client writes with `encode_request` and reads with
`decode_reply` (an error answer becomes the `DaemonError` subclass its code names) and
`decode_event`.
Does not own: what a request does (`_daemon.py`), the connection (`_daemon.py` on the daemon
side, `_client.py` on the CLI side), or the status figures' contents (`Daemon.status`).

Compatibility: the API ships with both ends. The CLI talks only to a daemon of its own build
(`_client._same_build` replaces any other), so nothing is negotiated; the wire shape is the
one docs/commands.md ("Control API") describes, and it stays as it is for scripts that speak
it: `{"id": N, "op": "...", ...}` in, `{"id": N, "ok": true, "result": {...}}` or
`{"id": N, "ok": false, "error": {"code", "message"[, "errors"]}}` out, events
`{"event": "...", ...}` in between.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from mirrord.daemon._exceptions import BadRequest, DaemonError, error_for_code

__all__ = [
    "AgentLostEvent",
    "Answer",
    "CloseSession",
    "ClosedEvent",
    "ControlEvent",
    "ControlRequest",
    "CreateSession",
    "DisconnectedEvent",
    "Done",
    "ListSessions",
    "ProcessEvent",
    "ProgressEvent",
    "Request",
    "RequestId",
    "SessionCreated",
    "SessionIdle",
    "SessionList",
    "SessionStatistics",
    "SessionStatus",
    "Shutdown",
    "ShutdownStarted",
    "Status",
    "StatusReport",
    "WaitSession",
    "WarningEvent",
    "decode_event",
    "decode_line",
    "decode_reply",
    "encode_answer",
    "encode_error",
    "encode_event",
    "encode_request",
    "read_line",
    "request_from",
]

RequestId = int | str | None
A = TypeVar("A")
T = TypeVar("T")


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# A message from the daemon that does not have the shape this module gives it is a bug in
# mirrord (the CLI talks only to a daemon of its own build): decoding raises `KeyError` for a
# required field that is missing and `TypeError` for a field of the wrong type, and the CLI
# ends it as an internal error (one line, the traceback saved). Nothing is filled in.


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"the mirrord daemon's {what} is not a JSON object: {value!r}")
    return value


def _typed(value: Any, kind: type[T], name: str, what: str) -> T:
    # bool is an int subclass in Python; JSON's true/false is never a number here
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"the mirrord daemon's {what} has {name}={value!r}, not a {kind.__name__}")
    return value


def _required(obj: dict[str, Any], name: str, kind: type[T], what: str) -> T:
    if name not in obj:
        raise KeyError(f"the mirrord daemon's {what} has no {name!r}: {obj!r}")
    return _typed(obj[name], kind, name, what)


def _optional(obj: dict[str, Any], name: str, kind: type[T], default: T, what: str) -> T:
    return _typed(obj[name], kind, name, what) if name in obj else default


def _strings(value: list[Any], name: str, what: str) -> list[str]:
    return [_typed(item, str, f"{name}[{i}]", what) for i, item in enumerate(value)]


# ---------------------------------------------------------------------------------- answers


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReport:
    """`status`: the daemon, its sessions, agents and totals (what `daemon status --json`
    prints; the figures are `Daemon.status`'s)."""

    status: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return self.status

    @classmethod
    def from_json(cls, result: Any) -> StatusReport:
        return cls(status=_object(result, "status answer"))


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionList:
    """`list_sessions`: each session's statistics."""

    sessions: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"sessions": self.sessions}

    @classmethod
    def from_json(cls, result: Any) -> SessionList:
        what = "list_sessions answer"
        sessions = _required(_object(result, what), "sessions", list, what)
        return cls(sessions=[_object(s, f"{what}'s session") for s in sessions])


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStatistics:
    """`session`: one session's statistics."""

    statistics: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return self.statistics

    @classmethod
    def from_json(cls, result: Any) -> SessionStatistics:
        return cls(statistics=_object(result, "session answer"))


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionCreated:
    """`create_session`: the session, the environment of its user command (`unset`: names the
    client removes from its own), its agent and the warnings to show."""

    session: str
    env: dict[str, str]
    unset: list[str] = field(default_factory=list)
    agent: str = ""
    agent_description: str = ""
    layer_socket: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "env": self.env,
            "unset": self.unset,
            "agent": self.agent,
            "agent_description": self.agent_description,
            "layer_socket": self.layer_socket,
            "warnings": self.warnings,
        }

    @classmethod
    def from_json(cls, result: Any) -> SessionCreated:
        what = "create_session answer"
        result = _object(result, what)
        session = _required(result, "session", str, what)
        if not session:
            raise TypeError(f"the mirrord daemon's {what} has an empty session id: {result!r}")
        env = _required(result, "env", dict, what)
        return cls(
            session=session,
            env={name: _typed(value, str, f"env[{name!r}]", what) for name, value in env.items()},
            unset=_strings(_optional(result, "unset", list, [], what), "unset", what),
            agent=_optional(result, "agent", str, "", what),
            agent_description=_optional(result, "agent_description", str, "", what),
            layer_socket=_optional(result, "layer_socket", str, "", what),
            warnings=_strings(_optional(result, "warnings", list, [], what), "warnings", what),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """`close_session`: nothing to say."""

    def to_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, result: Any) -> Done:
        _object(result, "close_session answer")
        return cls()


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionIdle:
    """`wait_session`: the session's processes are all gone (`registered`: after at least one
    registered), or the wait timed out with none; `state` is the session's."""

    idle: bool = True
    registered: bool = False
    state: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"idle": self.idle, "registered": self.registered, "state": self.state}

    @classmethod
    def from_json(cls, result: Any) -> SessionIdle:
        what = "wait_session answer"
        result = _object(result, what)
        return cls(
            idle=_required(result, "idle", bool, what),
            registered=_required(result, "registered", bool, what),
            state=_required(result, "state", str, what),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownStarted:
    """`shutdown`: the daemon's pid, to wait for its exit."""

    pid: int

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid}

    @classmethod
    def from_json(cls, result: Any) -> ShutdownStarted:
        what = "shutdown answer"
        return cls(pid=_required(_object(result, what), "pid", int, what))


Answer = (
    StatusReport | SessionList | SessionStatistics | SessionCreated | Done | SessionIdle
) | ShutdownStarted


# ---------------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlRequest(Generic[A]):
    """A request; `answer(result)` reads the result of its successful answer."""

    op: ClassVar[str] = ""

    def params(self) -> dict[str, Any]:
        return {}

    def answer(self, result: Any) -> A:
        raise NotImplementedError


class Status(ControlRequest[StatusReport]):
    __slots__ = ()
    op: ClassVar[str] = "status"

    def answer(self, result: Any) -> StatusReport:
        return StatusReport.from_json(result)


class ListSessions(ControlRequest[SessionList]):
    __slots__ = ()
    op: ClassVar[str] = "list_sessions"

    def answer(self, result: Any) -> SessionList:
        return SessionList.from_json(result)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStatus(ControlRequest[SessionStatistics]):
    op: ClassVar[str] = "session"
    session: str

    def params(self) -> dict[str, Any]:
        return {"session": self.session}

    def answer(self, result: Any) -> SessionStatistics:
        return SessionStatistics.from_json(result)


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateSession(ControlRequest[SessionCreated]):
    """Either `config_request` (`{config_file, flags, env, cwd}`, resolved by the daemon: what
    the CLI sends) or `target` + `config` (a resolved config as JSON); `client_pid` is the
    command's process, `cwd` its directory, `label` what `status` shows, `debug` the layer's
    debug output."""

    op: ClassVar[str] = "create_session"
    config_request: dict[str, Any] | None = None
    target: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    client_pid: int = 0
    cwd: str | None = None
    label: str = ""
    debug: bool = False

    def __post_init__(self) -> None:
        if self.config_request is None and not self.target:
            raise BadRequest("create_session needs a target (for example pid/1234)")

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "client_pid": self.client_pid,
            "cwd": self.cwd,
            "label": self.label,
            "debug": self.debug,
        }
        if self.config_request is not None:
            params["config_request"] = self.config_request
        else:
            params["target"] = self.target
            params["config"] = self.config
        return params

    def answer(self, result: Any) -> SessionCreated:
        return SessionCreated.from_json(result)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CreateSession:
        raw_pid = params.get("client_pid")
        try:
            client_pid = int(raw_pid or 0)
        except (TypeError, ValueError, OverflowError):
            raise BadRequest(f"create_session: client_pid must be a pid, got {raw_pid!r}") from None
        if not 0 <= client_pid < 2**31:
            raise BadRequest(f"create_session: client_pid must be a pid, got {raw_pid!r}")
        cwd = params.get("cwd")
        common: dict[str, Any] = {
            "client_pid": client_pid,
            "cwd": None if cwd is None else str(cwd),
            "label": str(params.get("label") or ""),
            "debug": bool(params.get("debug")),
        }
        config_request = params.get("config_request")
        if isinstance(config_request, dict):
            return cls(config_request=config_request, **common)
        target = params.get("target")
        if not isinstance(target, str) or not target:
            raise BadRequest("create_session needs a target (for example pid/1234)")
        config = params.get("config") or {}
        if not isinstance(config, dict):
            raise BadRequest("create_session: config must be a JSON object")
        return cls(target=target, config=config, **common)


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseSession(ControlRequest[Done]):
    op: ClassVar[str] = "close_session"
    session: str
    reason: str = "closed by its client"

    def params(self) -> dict[str, Any]:
        return {"session": self.session, "reason": self.reason}

    def answer(self, result: Any) -> Done:
        return Done.from_json(result)


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitSession(ControlRequest[SessionIdle]):
    """Until the session's processes are all gone after one registered, or `wait_timeout`
    seconds (default 60; 0: do not wait) with none registered."""

    op: ClassVar[str] = "wait_session"
    session: str
    wait_timeout: float | None = None

    def params(self) -> dict[str, Any]:
        return {"session": self.session, "wait_timeout": self.wait_timeout}

    def answer(self, result: Any) -> SessionIdle:
        return SessionIdle.from_json(result)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> WaitSession:
        raw = params.get("wait_timeout")
        try:
            timeout = None if raw is None else max(float(raw), 0.0)
        except (TypeError, ValueError, OverflowError):
            raise BadRequest(f"wait_session: wait_timeout must be a number, got {raw!r}") from None
        return cls(session=_session_id(params), wait_timeout=timeout)


class Shutdown(ControlRequest[ShutdownStarted]):
    __slots__ = ()
    op: ClassVar[str] = "shutdown"

    def answer(self, result: Any) -> ShutdownStarted:
        return ShutdownStarted.from_json(result)


Request = (
    Status | ListSessions | SessionStatus | CreateSession | CloseSession | WaitSession
) | Shutdown


def _session_id(params: dict[str, Any]) -> str:
    return str(params.get("session") or "")


def read_line(line: bytes) -> tuple[RequestId, dict[str, Any]]:
    """A request line's id and fields. Raises `BadRequest` (the sender's error) for a line
    that is not UTF-8, not JSON, not an object, nested too deeply, or whose id is not a number
    or a string."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRequest(f"a control request is JSON in UTF-8 ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"a control request is one JSON object per line ({exc})") from None
    except RecursionError:
        raise BadRequest("a control request nests too deeply") from None
    if not isinstance(obj, dict):
        raise BadRequest("a control request is a JSON object")
    rid = obj.get("id")
    if not (rid is None or isinstance(rid, int | str)) or isinstance(rid, bool):
        raise BadRequest("a control request's id is a number or a string")
    return rid, obj


def request_from(fields: dict[str, Any]) -> Request:
    """The request `fields` (a line's object) ask for. Raises `BadRequest`."""
    op = str(fields.get("op"))
    if op == "status":
        return Status()
    if op == "list_sessions":
        return ListSessions()
    if op == "session":
        return SessionStatus(session=_session_id(fields))
    if op == "create_session":
        return CreateSession.from_params(fields)
    if op == "close_session":
        reason = str(fields.get("reason") or "closed by its client")
        return CloseSession(session=_session_id(fields), reason=reason)
    if op == "wait_session":
        return WaitSession.from_params(fields)
    if op == "shutdown":
        return Shutdown()
    raise BadRequest(f"unknown control op {op!r}")


def encode_request(rid: int, request: ControlRequest[Any]) -> bytes:
    return _line({"id": rid, "op": request.op, **request.params()})


def encode_answer(rid: RequestId, answer: Answer) -> bytes:
    return _line({"id": rid, "ok": True, "result": answer.to_json()})


def encode_error(rid: RequestId, exc: DaemonError) -> bytes:
    error: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.errors:
        error["errors"] = exc.errors
    return _line({"id": rid, "ok": False, "error": error})


def decode_line(line: bytes) -> Any:
    """What one line from the daemon holds (an answer or an event: the caller looks at
    `"event"` and `"id"`). Raises `ValueError` for a line that is not JSON."""
    return json.loads(line)


def decode_reply(request: ControlRequest[A], reply: dict[str, Any]) -> A:
    """The answer to `request` in `reply`; an error answer raises the `DaemonError` subclass
    its code names (`ControlError` for a code this version does not know). A reply without
    the fields its kind needs raises `KeyError`/`TypeError` (a bug, see above)."""
    what = f"answer to {request.op}"
    if not _required(reply, "ok", bool, what):
        error = _required(reply, "error", dict, what)
        what = f"error answer to {request.op}"
        raise error_for_code(
            _required(error, "code", str, what),
            _required(error, "message", str, what),
            _strings(_optional(error, "errors", list, [], what), "errors", what),
        )
    return request.answer(_required(reply, "result", object, what))


# ---------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlEvent:
    """Something the daemon tells a control connection between answers; `message` is for the
    user (empty for events that carry figures only)."""

    kind: ClassVar[str] = ""
    session: str = ""  # the session it is about (none for `progress`)
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**self._about(), "message": self.message}

    def _about(self) -> dict[str, Any]:
        return (
            {"session": self.session, "event": self.kind} if self.session else {"event": self.kind}
        )


class ProgressEvent(ControlEvent):
    """A step while a session starts."""

    __slots__ = ()

    kind: ClassVar[str] = "progress"


class WarningEvent(ControlEvent):
    """A warning of a session this connection created."""

    __slots__ = ()

    kind: ClassVar[str] = "warning"


class AgentLostEvent(ControlEvent):
    """The agent of a session this connection created was lost: its remote calls now fail."""

    __slots__ = ()

    kind: ClassVar[str] = "agent_lost"


class ClosedEvent(ControlEvent):
    """A session this connection created was closed; `message` says why."""

    __slots__ = ()

    kind: ClassVar[str] = "closed"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessEvent(ControlEvent):
    """A layer process of a session this connection created registered or left."""

    kind: ClassVar[str] = "process"
    pid: int = 0
    registered: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**self._about(), "pid": self.pid, "registered": self.registered}


class DisconnectedEvent(ControlEvent):
    """Not sent by the daemon: the client's own, when the control connection ends."""

    __slots__ = ()

    kind: ClassVar[str] = "disconnected"


_EVENTS: dict[str, type[ControlEvent]] = {
    cls.kind: cls
    for cls in (ProgressEvent, WarningEvent, AgentLostEvent, ClosedEvent, ProcessEvent)
}


def encode_event(event: ControlEvent) -> bytes:
    return _line(event.to_json())


def decode_event(obj: dict[str, Any]) -> ControlEvent | None:
    """The event `obj` carries; None for a kind this version does not know. An event of a
    known kind without the fields it needs raises `KeyError`/`TypeError` (a bug, see above):
    every kind but `progress` names its session."""
    cls = _EVENTS.get(str(obj.get("event")))
    if cls is None:
        return None
    what = f"{cls.kind} event"
    if cls is ProgressEvent:
        session = _optional(obj, "session", str, "", what)
    else:
        session = _required(obj, "session", str, what)
    if cls is ProcessEvent:
        return ProcessEvent(
            session=session,
            pid=_required(obj, "pid", int, what),
            registered=_required(obj, "registered", bool, what),
        )
    return cls(session=session, message=_required(obj, "message", str, what))
