"""The OpenAPI document (what /docs and /redoc show) is complete for every route, and every documented 4xx of a
parameter answers with a message that names the parameter and what it may be.

The routes are walked from `app.routes`, so a new route without its documentation fails here.
"""

from __future__ import annotations

import fastapi.routing
import pytest
from fastapi.routing import APIRoute
from http_support import encode, white
from PIL import Image

IMAGE_FORMS = ("multipart/form-data", "image/png", "image/jpeg", "application/json")
ERROR_ENVELOPE = "#/components/schemas/ErrorBody"
V2_ENVELOPE = "#/components/schemas/V2ErrorBody"


def api_routes(app) -> list:
    """Every route of `app.routes`, through the routers it includes (FastAPI >= 0.160 wraps each included router;
    its route contexts carry the full path)."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = contexts(app.routes) if contexts else app.routes
    return [r for r in routes if isinstance(getattr(r, "original_route", r), APIRoute)]


def operations(app):
    """(route, method, operation) for every documented route."""
    doc = app.openapi()
    out = []
    for route in api_routes(app):
        if route.include_in_schema:
            for method in route.methods:
                out.append((route, method, doc["paths"][route.path_format][method.lower()]))
    return out


# POST routes under /v1 that read JSON only (image search: making a collection, adding vectors)
JSON_ONLY = {"/v1/collections", "/v1/collections/{name}/vectors"}


def takes_images(route) -> bool:
    return route.path.startswith("/v1/") and "POST" in route.methods and route.path not in JSON_ONLY


def can_fail_validation(operation: dict) -> bool:
    """A query parameter with a type or range that a request can miss."""
    for param in operation.get("parameters", []):
        schema = param["schema"]
        kinds = [schema, *schema.get("anyOf", [])]
        if param["in"] == "query" and any(k.get("type") in ("integer", "boolean") or "enum" in k for k in kinds):
            return True
    return False


def expected_errors(route, operation: dict) -> set[str]:
    """The statuses this route can answer with, from what it does."""
    statuses = {"500"}
    checked = route.path.startswith("/v1/") or route.path.startswith("/v2/models")
    if checked or route.path in ("/readyz", "/v2/health/ready"):
        statuses.add("503")  # not ready (and, for work, overloaded)
    if checked:
        statuses.add("401")  # with --api-key
    if "{name}" in route.path:
        statuses.add("404")
    if takes_images(route) or route.path.endswith("/infer"):
        statuses |= {"400", "404", "413", "415", "422", "504"}
    if can_fail_validation(operation):
        statuses.add("422")
    return statuses


def test_every_route_documents_its_body_answer_and_errors(client):
    ops = operations(client.app)
    assert len(ops) >= 19
    problems = []
    for route, method, op in ops:
        where = f"{method} {route.path}"
        # the request body, in each form the route reads
        if takes_images(route):
            content = op.get("requestBody", {}).get("content", {})
            for form in IMAGE_FORMS:
                if form not in content:
                    problems.append(f"{where}: no {form} request body")
            images = content.get("multipart/form-data", {}).get("schema", {}).get("properties", {}).get("images", {})
            if images.get("items", {}).get("format") != "binary":
                problems.append(f"{where}: the multipart body has no `images` file array")
        elif route.path.endswith("/infer"):
            content = op.get("requestBody", {}).get("content", {})
            if "inputs" not in content.get("application/json", {}).get("schema", {}).get("properties", {}):
                problems.append(f"{where}: no JSON inference request body")
        # the 200 answer (201 for a route that creates): a schema and an example
        success = "201" if "201" in op["responses"] else "200"
        answer = op["responses"].get(success, {}).get("content", {})
        if not answer:
            problems.append(f"{where}: no {success} answer documented")
        for media, spec in answer.items():
            if media == "image/png":
                continue
            if not spec.get("schema") or ("$ref" not in spec["schema"] and media == "application/json"):
                problems.append(f"{where}: {success} {media} has no schema")
            if "example" not in spec:
                problems.append(f"{where}: {success} {media} has no example")
        # the errors: every status it can send, each in its envelope, and nothing FastAPI invents
        documented = {s for s in op["responses"] if s != success}
        if missing := expected_errors(route, op) - documented:
            problems.append(f"{where}: undocumented errors {sorted(missing)}")
        envelope = V2_ENVELOPE if route.path.startswith("/v2") else ERROR_ENVELOPE
        for status in documented:
            spec = op["responses"][status].get("content", {}).get("application/json", {})
            if spec.get("schema", {}).get("$ref") != envelope or "example" not in spec:
                problems.append(f"{where}: {status} is not documented as {envelope} with an example")
    assert not problems, "\n".join(problems)
    assert "HTTPValidationError" not in str(client.app.openapi())


def test_the_docs_pages_load_their_assets_from_the_server(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "cdn" not in html.lower() and "https://" not in html, html
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css") if page == "/docs" else ("redoc.standalone.js",):
            url = next(part.split('"')[0] for part in html.split('"/') if asset in part.split('"')[0])
            r = client.get("/" + url)
            assert r.status_code == 200 and len(r.content) > 10_000, (page, url)


# -- every documented bad parameter value answers 422 naming the parameter and what it may be ------------


def bad_values(param: dict) -> list[tuple[str, list[str]]]:
    """(a bad value, words the message must hold) for one documented query parameter."""
    schema = param["schema"]
    kinds = [schema, *schema.get("anyOf", [])]
    out = []
    for kind in kinds:
        if "enum" in kind:
            out.append(("bogus", [str(v) for v in kind["enum"]]))
        elif kind.get("type") == "integer":
            out.append(("many", ["whole number"]))
            if "minimum" in kind:
                out.append((str(kind["minimum"] - 1), [str(kind["minimum"])]))
        elif kind.get("type") == "boolean":
            out.append(("maybe", ["true", "false"]))
    return out


def cases(app) -> list[tuple[str, str, str, str, list[str]]]:
    found = []
    for route, method, op in operations(app):
        for param in op.get("parameters", []):
            if param["in"] == "query":
                for value, words in bad_values(param):
                    found.append((method, route.path.replace("{name}", "tiny"), param["name"], value, words))
    return found


def call(client, method: str, path: str, params: dict):
    if method == "POST":
        return client.post(path, params=params, files=[("images", ("w.png", white(), "image/png"))])
    return client.get(path, params=params)


def test_every_documented_parameter_refuses_a_bad_value_by_name(client):
    found = cases(client.app)
    assert {c[2] for c in found} >= {"top_k", "pool", "normalize", "encoding", "method", "layer", "format"}
    problems = []
    for method, path, name, value, words in found:
        r = call(client, method, path, {name: value})
        message = r.json()["error"]["message"] if r.status_code == 422 else ""
        if r.status_code != 422 or name not in message or not all(w in message for w in words):
            problems.append(f"{method} {path}?{name}={value}: {r.status_code} {message!r} lacks {words}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "path, params, words",
    [
        ("/v1/classify", {"top_k": "11"}, ["top_k", "1", "10"]),  # the tiny model has 10 classes
        ("/v1/attention", {"method": "cls", "layer": "2"}, ["layer", "-2", "1"]),  # depth 2
        ("/v1/attention", {"method": "cls", "layer": "-3"}, ["layer", "-2", "1"]),
        ("/v1/attention", {"method": "cls", "head": "2"}, ["head", "mean", "0", "1"]),  # 2 heads
        ("/v1/attention", {"method": "cls", "head": "first"}, ["head", "mean", "0", "1"]),
        ("/v1/classify", {"model": "nope"}, ["nope", "tiny", "other", "headless"]),
        ("/v1/classify", {"model": "headless"}, ["headless", "/v1/embed"]),
    ],
)
def test_model_dependent_ranges_name_the_parameter_and_its_range(client, path, params, words):
    r = client.post(path, params=params, files=[("images", ("w.png", white(), "image/png"))])
    assert r.status_code in (404, 422), r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message


def test_png_of_several_images_names_format(client):
    png = encode(Image.new("RGB", (32, 32)))
    files = [("images", ("a.png", png, "image/png")), ("images", ("b.png", png, "image/png"))]
    r = client.post("/v1/attention", params={"format": "png"}, files=files)
    assert r.status_code == 422 and "format=png" in r.json()["error"]["message"]
