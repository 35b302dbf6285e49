"""A Model Registry REST server for tests, in memory, that checks every request against the registry's API.

Each request body is validated with the generated `mr_openapi` models the model-registry wheel ships
(the client's own copy of the registry's OpenAPI document), and fields those models do not define
are refused, so a request the real registry would reject is a recorded problem here. Only the calls
a registration makes are served; any other path is a problem too.
"""

import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
from aiohttp.test_utils import TestServer
from pydantic import BaseModel, ValidationError
from mr_openapi.models import (Artifact, ModelArtifact, ModelArtifactList, ModelVersion, ModelVersionCreate, RegisteredModel,
                               RegisteredModelCreate)

BASE = "/api/model_registry/v1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeRegistry:
    """Registered models, versions and artifacts by id; `problems` lists every request that broke the API."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.models: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.artifacts: dict[str, dict[str, Any]] = {}  # id -> artifact, with "_version" naming its version
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.problems: list[str] = []
        self._ids = itertools.count(1)

    def _stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        millis = str(int(time.time() * 1000))
        return {**body, "id": str(next(self._ids)), "createTimeSinceEpoch": millis, "lastUpdateTimeSinceEpoch": millis,
                "state": body.get("state") or "LIVE"}

    def add_model(self, name: str) -> str:
        """A registered model that already exists (as a user registered it earlier)."""
        model = self._stamp({"name": name})
        self.models[model["id"]] = model
        return model["id"]

    def _checked(self, model: type[BaseModel], body: Any, where: str) -> bool:
        """Whether `body` is a valid `model`, with no field the registry does not define."""
        if not isinstance(body, dict):
            self.problems.append(f"{where}: the body is not a JSON object")
            return False
        known = {field.alias or name for name, field in model.model_fields.items()}
        if unknown := set(body) - known:
            self.problems.append(f"{where}: fields {sorted(unknown)} are not in {model.__name__}")
            return False
        try:
            model.from_dict(body)  # type: ignore[attr-defined]  (the generated models' own reader, oneOf values included)
        except (ValidationError, ValueError) as err:
            self.problems.append(f"{where}: not a valid {model.__name__}: {err}")
            return False
        return True

    @staticmethod
    def _error(status: int, message: str) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"code": str(status), "message": message}, status=status)

    @staticmethod
    def _valid(model: type[BaseModel], body: dict[str, Any], status: int = 200) -> aiohttp.web.Response:
        """`body` as the registry answers it (201 for what it created), checked against the response model first."""
        return aiohttp.web.json_response(model.from_dict(body).to_dict(), status=status)  # type: ignore[attr-defined]

    @aiohttp.web.middleware
    async def _gate(self, request: aiohttp.web.Request, handler: Any) -> aiohttp.web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, dict(request.query), body))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(401, "a bearer token is required")
        return await handler(request)

    @staticmethod
    async def _body(request: aiohttp.web.Request) -> Any:
        return await request.json()  # read once by the gate; aiohttp keeps it

    async def find_model(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        name = request.query.get("name")
        found = next((m for m in self.models.values() if m["name"] == name), None)
        return self._valid(RegisteredModel, found) if found else self._error(404, f"no registered model {name!r}")

    async def create_model(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        body = await self._body(request)
        if not self._checked(RegisteredModelCreate, body, "POST registered_models"):
            return self._error(400, "invalid RegisteredModelCreate")
        if any(m["name"] == body["name"] for m in self.models.values()):
            return self._error(409, f"registered model {body['name']!r} exists")
        model = self._stamp(body)
        self.models[model["id"]] = model
        return self._valid(RegisteredModel, model, 201)

    async def find_version(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        name, parent = request.query.get("name"), request.query.get("parentResourceId")
        if not name or not parent:
            self.problems.append("GET model_version: a version is found by name and parentResourceId")
        found = next((v for v in self.versions.values() if v["name"] == name and v["registeredModelId"] == parent), None)
        return self._valid(ModelVersion, found) if found else self._error(404, f"no version {name!r}")

    async def create_version(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        body = await self._body(request)
        if not self._checked(ModelVersionCreate, body, "POST model_versions"):
            return self._error(400, "invalid ModelVersionCreate")
        if body["registeredModelId"] not in self.models:
            self.problems.append(f"POST model_versions: no registered model {body['registeredModelId']}")
            return self._error(404, "no such registered model")
        version = self._stamp(body)
        self.versions[version["id"]] = version
        return self._valid(ModelVersion, version, 201)

    async def version_artifacts(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        version = request.match_info["id"]
        if version not in self.versions:
            return self._error(404, f"no version {version}")
        if request.method == "GET":
            items = [{k: v for k, v in a.items() if k != "_version"} for a in self.artifacts.values() if a["_version"] == version]
            return self._valid(ModelArtifactList, {"items": items, "size": len(items), "pageSize": 100, "nextPageToken": ""})
        body = await self._body(request)
        if not isinstance(body, dict) or body.get("artifactType") != "model-artifact":
            self.problems.append(f"POST model_versions/{version}/artifacts: artifactType must be model-artifact")
            return self._error(400, "invalid Artifact")
        try:
            Artifact.from_dict(body)
        except (ValidationError, ValueError) as err:
            self.problems.append(f"POST model_versions/{version}/artifacts: not a valid Artifact: {err}")
            return self._error(400, "invalid Artifact")
        if not self._checked(ModelArtifact, body, f"POST model_versions/{version}/artifacts"):
            return self._error(400, "invalid ModelArtifact")
        artifact = self._stamp(body)
        self.artifacts[artifact["id"]] = {**artifact, "_version": version}
        return self._valid(ModelArtifact, artifact, 201)

    async def unknown(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.problems.append(f"{request.method} {request.path}: not a call a registration makes")
        return self._error(404, "not served here")

    def app(self) -> aiohttp.web.Application:
        app = aiohttp.web.Application(middlewares=[self._gate])
        app.router.add_get(f"{BASE}/registered_model", self.find_model)
        app.router.add_post(f"{BASE}/registered_models", self.create_model)
        app.router.add_get(f"{BASE}/model_version", self.find_version)
        app.router.add_post(f"{BASE}/model_versions", self.create_version)
        app.router.add_route("*", f"{BASE}/model_versions/{{id}}/artifacts", self.version_artifacts)
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        return app


@contextlib.asynccontextmanager
async def registry_serving(registry: FakeRegistry, port: int | None = None) -> AsyncIterator[str]:
    """Serve `registry` on 127.0.0.1 (at `port` when given); yields its base URL."""
    server = TestServer(registry.app(), host="127.0.0.1", port=port or free_port())
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()
