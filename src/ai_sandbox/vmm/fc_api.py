"""Typed client for the Firecracker API on its Unix socket (spec: shared/reference/firecracker-api-*.yaml).

Models mirror the spec's definitions; bodies drop None fields, and unknown fields are refused here because
Firecracker refuses them too (serde deny_unknown_fields).
"""

from __future__ import annotations

from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ai_sandbox.errors import VMError


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def body(self) -> dict[str, Any]:
        """The JSON body: None fields dropped, so Firecracker applies its own defaults."""
        return self.model_dump(mode="json", exclude_none=True)


class Logger(Model):
    log_path: str
    level: Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"] | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None


class MachineConfiguration(Model):
    vcpu_count: int = Field(ge=1, le=32)
    mem_size_mib: int = Field(ge=1)
    smt: bool | None = None


class BootSource(Model):
    kernel_image_path: str
    initrd_path: str | None = None
    boot_args: str | None = None


class Drive(Model):
    drive_id: str
    is_root_device: bool
    path_on_host: str
    is_read_only: bool
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    io_engine: Literal["Sync", "Async"] | None = None


class NetworkInterface(Model):
    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None


class Vsock(Model):
    guest_cid: int = Field(ge=3)
    uds_path: str


class InstanceActionInfo(Model):
    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]


class InstanceInfo(BaseModel):
    """GET / answer; extra fields are tolerated so a newer Firecracker does not break status."""

    app_name: str
    id: str
    state: Literal["Not started", "Running", "Paused"]
    vmm_version: str


def fault_message(resp: httpx.Response) -> str:
    """The server's `fault_message`, or the raw body when it is not the spec's Error object."""
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return data["fault_message"]
    return resp.text.strip() or resp.reason_phrase


class FirecrackerAPI:
    """PUT typed bodies, GET /; any non-2xx raises VMError carrying Firecracker's fault_message."""

    def __init__(self, transport: httpx.BaseTransport, timeout: float = 10.0) -> None:
        # Firecracker ignores the host; httpx needs one to form a URL.
        self._client = httpx.Client(transport=transport, base_url="http://localhost", timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FirecrackerAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: Model | None = None) -> httpx.Response:
        try:
            resp = self._client.request(method, path, json=body.body() if body is not None else None)
        except httpx.HTTPError as e:
            raise VMError(f"firecracker API {method} {path}: {str(e) or type(e).__name__}") from e
        if not resp.is_success:
            raise VMError(f"firecracker API {method} {path} failed ({resp.status_code}): {fault_message(resp)}")
        return resp

    def put(self, path: str, body: Model) -> None:
        self._request("PUT", path, body)

    def describe(self) -> InstanceInfo:
        """GET /: the instance state."""
        resp = self._request("GET", "/")
        try:
            return InstanceInfo.model_validate(resp.json())
        except (ValueError, ValidationError) as e:
            raise VMError(f"firecracker API GET / answered something unexpected: {resp.text[:200]}") from e

    def action(self, action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]) -> None:
        self.put("/actions", InstanceActionInfo(action_type=action_type))


Request = tuple[str, Model]  # (path, body) of one PUT


def send(api: FirecrackerAPI, requests: list[Request]) -> None:
    """PUT each request in order (the boot plan)."""
    for path, body in requests:
        api.put(path, body)
