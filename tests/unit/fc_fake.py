"""A fake Firecracker for contract tests: the API per the published spec, served like the real process.

No Firecracker can run on this host, so this stands in for the *process*: run as `firecracker --api-sock P --id N`
(or as `jailer ... -- --api-sock /P`) it binds the API socket, answers per the spec (204 on success, 400 with
`fault_message` on a bad body), writes the "serial console" to stdout, and exits after SendCtrlAltDel.
Every call is appended as a JSON line to $FC_FAKE_RECORD. Knobs: FC_FAKE_FAIL (JSON {"PUT /drives/x": "msg"}),
FC_FAKE_IGNORE_CAD=1, FC_FAKE_EXIT=<message> (die before binding), FC_FAKE_DELAY=<seconds before binding>.
"""

from __future__ import annotations

import copy
import functools
import http.server
import json
import os
import re
import socket
import socketserver
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

SPEC_PATH = Path(
    os.environ.get("AI_SANDBOX_FC_API_SPEC")
    or Path(__file__).resolve().parents[3] / "shared" / "reference" / "firecracker-api-v1.17.0-dev.yaml"
)
SPEC_URI = "urn:firecracker-api"


def _strict(schema: Any) -> Any:
    """Refuse unknown fields where the spec is silent: Firecracker's serde structs deny them."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def load_spec() -> dict[str, Any]:
    """The swagger 2.0 spec with strict definitions."""
    spec = yaml.safe_load(SPEC_PATH.read_text())
    spec = copy.deepcopy(spec)
    spec["definitions"] = _strict(spec["definitions"])
    return spec


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(SPEC_URI, Resource.from_contents(load_spec(), default_specification=DRAFT4))


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template)) + "$")


def operation(method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    """(path template, operation object) for a concrete request path."""
    for template, ops in load_spec()["paths"].items():
        if _template_regex(template).match(path) and method.lower() in ops:
            return template, ops[method.lower()]
    return None


def body_validator(method: str, path: str) -> OAS30Validator | None:
    """Validator for the body schema the spec declares for method+path (None: no body parameter)."""
    op = operation(method, path)
    if op is None:
        raise KeyError(f"{method} {path} is not in the spec")
    for param in op[1].get("parameters", []):
        if param.get("in") == "body":
            ref = param["schema"]["$ref"]  # "#/definitions/Drive"
            return OAS30Validator({"$ref": SPEC_URI + ref}, registry=_registry())
    return None


def spec_errors(method: str, path: str, body: Any) -> list[str]:
    """Why `body` does not fit the spec's schema for method+path (empty: it fits)."""
    validator = body_validator(method, path)
    if validator is None:
        return [] if body is None else ["this endpoint takes no body"]
    return [f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}" for e in validator.iter_errors(body)]


def response_errors(method: str, path: str, status: int, body: Any) -> list[str]:
    """Why a response does not fit the spec (the fake's own answers are checked too)."""
    op = operation(method, path)
    if op is None:
        return [f"{method} {path} is not in the spec"]
    declared = op[1]["responses"].get(status) or op[1]["responses"]["default"]
    if "schema" not in declared:
        return [] if body is None else [f"status {status} takes no body"]
    validator = OAS30Validator({"$ref": SPEC_URI + declared["schema"]["$ref"]}, registry=_registry())
    return [e.message for e in validator.iter_errors(body)]


@dataclass
class FakeAPI:
    """Firecracker's API semantics that matter to the driver, checked against the spec."""

    instance_id: str = "fake"
    root: Path = Path("/")  # the jail root when run as the jailer
    fail: dict[str, str] = field(default_factory=dict)
    ignore_ctrl_alt_del: bool = False
    calls: list[dict[str, Any]] = field(default_factory=list)
    configured: dict[str, Any] = field(default_factory=dict)
    state: str = "Not started"
    exit_requested: bool = False
    on_call: Any = None  # callable(record) for the process mode

    def _host(self, p: str) -> Path:
        return self.root / p.lstrip("/") if self.root != Path("/") else Path(p)

    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError as e:
            return 400, {"fault_message": f"Syntax error: {e}"}
        record = {"method": method, "path": path, "body": body}
        self.calls.append(record)
        if self.on_call:
            self.on_call(record)
        if f"{method} {path}" in self.fail:
            return 400, {"fault_message": self.fail[f"{method} {path}"]}
        if method == "GET" and path == "/":
            info = {"app_name": "Firecracker", "id": self.instance_id, "state": self.state, "vmm_version": "fake"}
            return 200, info
        if operation(method, path) is None:
            return 400, {"fault_message": f"Invalid request method and/or path: {method} {path}."}
        if errors := spec_errors(method, path, body):
            return 400, {"fault_message": f"An error occurred when deserializing the json body: {errors[0]}"}
        return self._apply(method, path, body)

    def _apply(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        if path == "/actions":
            return self._action(body["action_type"])
        if self.state != "Not started":
            return 400, {"fault_message": "The requested operation is not supported after starting the microVM."}
        for key in ("drive_id", "iface_id"):
            if key in body and path.rsplit("/", 1)[-1] != body[key]:
                return 400, {"fault_message": "The id from the path does not match the id from the body!"}
        for key in ("kernel_image_path", "initrd_path", "path_on_host"):
            if key in body and not self._host(body[key]).is_file():
                return 400, {"fault_message": f"Cannot open {key} {body[key]}: No such file or directory"}
        if path == "/logger":
            # Like Firecracker: O_CREAT without O_TRUNC or O_APPEND, writing from offset 0.
            fd = os.open(self._host(body["log_path"]), os.O_CREAT | os.O_RDWR | os.O_NONBLOCK, 0o600)
            os.write(fd, b"fake firecracker log\n")
            os.close(fd)
        self.configured[path] = body
        return 204, None

    def _action(self, action: str) -> tuple[int, dict[str, Any] | None]:
        if action == "InstanceStart":
            if "/boot-source" not in self.configured:
                return 400, {"fault_message": "Cannot start microvm without kernel configuration."}
            self.state = "Running"
        elif action == "SendCtrlAltDel":
            if self.state != "Running":
                return 400, {"fault_message": "The requested operation is not supported before starting the microVM."}
            self.exit_requested = not self.ignore_ctrl_alt_del
        return 204, None


def mock_transport(api: FakeAPI) -> httpx.MockTransport:
    """The fake API as an in-process httpx transport."""

    def handler(request: httpx.Request) -> httpx.Response:
        status, body = api.handle(request.method, request.url.path, request.content)
        return httpx.Response(status, json=body) if body is not None else httpx.Response(status)

    return httpx.MockTransport(handler)


# -- process mode -----------------------------------------------------------------------------------------------


def _option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv[:-1]):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _paths(role: str, argv: list[str]) -> tuple[Path, Path, str]:
    """(API socket path on the host, root, instance id) from a firecracker or jailer command line."""
    instance = _option(argv, "--id") or "anonymous"
    if role == "firecracker":
        return Path(_option(argv, "--api-sock") or "/run/firecracker.socket"), Path("/"), instance
    exec_file = Path(_option(argv, "--exec-file") or "firecracker").resolve()
    root = Path(_option(argv, "--chroot-base-dir") or "/srv/jailer") / exec_file.name / instance / "root"
    inner = argv[argv.index("--") + 1 :] if "--" in argv else []
    return root / (_option(inner, "--api-sock") or "run/firecracker.socket").lstrip("/"), root, instance


def _bind_unix(path: Path) -> socket.socket:
    """Bind and listen like Firecracker does for the vsock uds_path (nobody connects in tests)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def main(role: str, argv: list[str]) -> int:
    """Run as a fake `firecracker` or `jailer` process."""
    record_file = os.environ.get("FC_FAKE_RECORD")
    if msg := os.environ.get("FC_FAKE_EXIT"):
        print(msg, file=sys.stderr, flush=True)
        return 1
    time.sleep(float(os.environ.get("FC_FAKE_DELAY", "0.1")))  # the driver must wait for the socket
    sock_path, root, instance = _paths(role, argv)
    keep: list[socket.socket] = []

    def on_call(record: dict[str, Any]) -> None:
        if record_file:
            with open(record_file, "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), **record}) + "\n")

    api = FakeAPI(
        instance_id=instance,
        root=root,
        fail=json.loads(os.environ.get("FC_FAKE_FAIL", "{}")),
        ignore_ctrl_alt_del=os.environ.get("FC_FAKE_IGNORE_CAD") == "1",
        on_call=on_call,
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def _serve(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            was = api.state
            status, body = api.handle(self.command, self.path, raw)
            # Side effects happen before the answer, as in Firecracker, so the driver may rely on them.
            if self.path == "/vsock" and status == 204:
                keep.append(_bind_unix(api._host(api.configured["/vsock"]["uds_path"])))
            if was == "Not started" and api.state == "Running":
                print(f"fake guest {instance}: serial console up", flush=True)
            self.send_response(status)
            if body is None:  # 204: no body, and a client may hang up right after the headers
                self.end_headers()
                return
            payload = json.dumps(body).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(socketserver.UnixStreamServer):
        def get_request(self):  # type: ignore[no-untyped-def]
            conn, _ = self.socket.accept()
            return conn, ("fake", 0)  # BaseHTTPRequestHandler wants a (host, port) client address

    server = Server(str(sock_path), Handler)
    server.timeout = 0.05
    on_call({"event": "listening", "socket": str(sock_path)})
    while not api.exit_requested:
        server.handle_request()
    # Like Firecracker, leave the socket files behind: the driver must clean them up.
    print(f"fake guest {instance}: reboot: Restarting system", flush=True)
    return 0


def read_record(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[0]).name, sys.argv[1:]))
