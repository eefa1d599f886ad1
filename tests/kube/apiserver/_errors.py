"""`Status` errors exactly as the API server sends them."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Raised by a handler; becomes a `Status` body with this code and reason."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def not_found(group: str, plural: str, name: str) -> ApiError:
    kind = f"{plural}.{group}" if group else plural
    return ApiError(
        404,
        "NotFound",
        f'{kind} "{name}" not found',
        {"name": name, "group": group, "kind": plural},
    )


def already_exists(group: str, plural: str, name: str) -> ApiError:
    kind = f"{plural}.{group}" if group else plural
    return ApiError(
        409,
        "AlreadyExists",
        f'{kind} "{name}" already exists',
        {"name": name, "group": group, "kind": plural},
    )


def forbidden(
    user: str, *, verb: str, group: str, resource: str, ns: str | None, name: str
) -> ApiError:
    base = resource.split("/", maxsplit=1)[0]
    what = f"{base}{'.' + group if group else ''}"
    thing = f'{what} "{name}"' if name else what
    scope = f'in the namespace "{ns}"' if ns else "at the cluster scope"
    return ApiError(
        403,
        "Forbidden",
        f'{thing} is forbidden: User "{user}" cannot {verb} resource "{resource}" in API group '
        f'"{group}" {scope}',
        {"name": name, "group": group, "kind": resource.split("/", maxsplit=1)[0]},
    )
