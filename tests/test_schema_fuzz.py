"""schemathesis: requests generated from the app's own OpenAPI schema never get a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

schema = schemathesis.pytest.from_fixture("fuzz_schema")


@pytest.fixture(scope="module")
def fuzz_schema(settings, engine, recognizer):
    """The schema of an app of its own around the shared engine (schemathesis runs its lifespan as it
    pleases). Fuzzed requests may ask for long outputs: each generation stops after a second of work."""
    from app import create_app

    quick = settings.model_copy(update={"generation_timeout_seconds": 1.0, "max_audio_seconds": 1.0})
    return schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(quick, engine=engine, recognizer=recognizer)
    )


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_gets_a_server_error(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and body["error"]["message"]
