"""Property-based contract test: schemathesis drives every operation of our own OpenAPI schema on a live server.

No generated request, valid (positive) or invalid (negative), may get a 5xx; every answer must use a documented
status code and content type and match its documented schema; invalid inputs must be rejected with a 4xx.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
# an invalid request may be refused for its size too (too many ids or files): 413 counts as a rejection
KNOWN = {"labelset_id": "known", "model_id": "run1"}  # what the `api` fixture serves
CONFIG = {"checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 404, 409, 413, 422]}}}


def _can_be_invalid(schema: dict) -> bool:
    """False for a parameter that any string satisfies (nothing for negative mode to break)."""
    return any(o.get("type") not in ("string", "null") or set(o) - {"type", "title", "description", "examples"}
               for o in schema.get("anyOf", [schema]))


def _operations():
    """(method, path, mode, fixed ids) for every operation: random ids, and for reads also the fixture's own ids
    (labelset 'known', model 'run1') so the handlers behind the 404s get fuzzed too; negative mode only where some
    input can be invalid."""
    spec = create_app(Settings()).openapi()  # building the app does no I/O: the lifespan is not run here
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            fixed = [None] + [{k: v for k, v in KNOWN.items() if k in names}] * bool(names & set(KNOWN))
            for ids in fixed:
                if ids and method == "delete":
                    continue
                # negative mode needs an input left to break: a fixed id (the fixture's own) is not one
                free = [p for p in op.get("parameters", []) if p["name"] not in (ids or {})]
                modes = ["positive"] + ["negative"] * bool(op.get("requestBody")
                                                           or any(_can_be_invalid(p["schema"]) for p in free))
                out += [(method.upper(), path, mode, ids) for mode in modes]
    return out


@pytest.fixture(scope="module")
def api_schema(api):
    return schemathesis.openapi.from_url(f"{api.base_url}/openapi.json", config=schemathesis.Config.from_dict(CONFIG))


@pytest.mark.parametrize("method, path, mode, ids", _operations())
def test_no_5xx_and_every_answer_matches_the_schema(api_schema, api_key, method, path, mode, ids):
    # job submission is fuzzed without the key (so: 401), since a valid generated config would start real training;
    # every other operation gets the key, so its handler, not the auth check, answers
    headers = {} if (method, path) == ("POST", "/v1/jobs") else {"X-API-Key": api_key}
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode), path_parameters=ids))
    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def conforms(case):
        case.call_and_validate(headers=headers, checks=CHECKS)

    conforms()
