"""The CRDs bound what a spec may hold, and the embedded API enforces their schemas as a real API server does.

The third adversarial run stored a 1 MB `spec.revision` and `spec.id: ../../../../etc` with 201, and answered an
oversized body with 500; a real API server refuses the first by the CRD's maxLength and the last with 413.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = "/apis/lorafleet.io/v1alpha1/namespaces/default/adapters"


def adapter(name: str, **spec) -> dict:  # noqa: ANN003
    return {"apiVersion": "lorafleet.io/v1alpha1", "kind": "Adapter", "metadata": {"name": name},
            "spec": {"baseModel": "smollm2", "id": "org/adapter", **spec}}


@pytest.fixture
def api(kube_api, kubectl):  # noqa: ANN001, ANN201
    kubectl("apply", "-k", str(ROOT / "crds"))
    return kube_api


@pytest.mark.parametrize(("spec", "field", "says"), [
    ({"revision": "v" * 1_000_000}, "spec.revision", "Too long: may not be more than 255 bytes"),
    ({"revision": "main; rm -rf /"}, "spec.revision", "Invalid value: 'main; rm -rf /': should match '^[A-Za-z0-9._/-]+$'"),
    ({"id": "x" * 600}, "spec.id", "Too long: may not be more than 512 bytes"),
    ({"id": "org/a b"}, "spec.id", "should match"),
    ({"baseModel": "Not_A_Name"}, "spec.baseModel", "should match"),
    ({"source": "ftp"}, "spec.source", "Unsupported value: 'ftp': supported values: 'hub', 'local', 's3'"),
    ({"warmReplicas": -1}, "spec.warmReplicas", "Invalid value: -1: should be greater than or equal to 0"),
])
def test_a_spec_past_the_crd_bounds_is_refused_with_the_field(api, spec: dict, field: str, says: str) -> None:  # noqa: ANN001
    response = httpx.post(api.url + ADAPTERS, json=adapter("bad", **spec), timeout=30)
    assert response.status_code == 422, response.text[:300]
    status = response.json()
    assert status["reason"] == "Invalid" and f'Adapter "bad" is invalid: {field}:' in status["message"] and says in status["message"]
    assert httpx.get(api.url + ADAPTERS + "/bad", timeout=30).status_code == 404  # nothing stored


def test_a_valid_spec_is_stored_and_an_update_past_the_bounds_is_refused(api, kubectl) -> None:  # noqa: ANN001
    created = httpx.post(api.url + ADAPTERS, json=adapter("good", revision="refs/pr/3", source="hub"), timeout=30)
    assert created.status_code == 201
    patched = kubectl("patch", "adapter", "good", "--type=merge", "-p", '{"spec": {"revision": "a b"}}', check=False)
    assert patched.returncode != 0 and "spec.revision" in patched.stderr
    assert kubectl("get", "adapter", "good", "-o", "jsonpath={.spec.revision}").stdout == "refs/pr/3"


def test_an_oversized_body_is_413_not_500(api) -> None:  # noqa: ANN001
    response = httpx.post(api.url + ADAPTERS, content=b'{"x": "' + b"y" * (4 << 20) + b'"}', headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413 and response.json()["reason"] == "RequestEntityTooLarge"
