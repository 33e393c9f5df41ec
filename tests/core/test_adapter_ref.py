"""One identity for an adapter version: the replica's key, the ring's key and the catalogue entry agree everywhere."""

from __future__ import annotations

import pytest

from lorafleet import ring
from lorafleet.adapter_ref import AdapterRef, catalogue_entries, catalogue_version
from lorafleet.gateway.catalogue import Catalogue
from lorafleet.operator.adapter_status import AdapterRecord
from lorafleet.operator.fleet_status import placement


def test_the_names_of_one_version() -> None:
    ref = AdapterRef.parse("acme/x", "hub", "v2")
    assert (ref.key, ref.ring_key) == ("hub:acme/x@v2", "acme/x@v2")
    assert AdapterRef.parse("acme/x@v2", "hub") == ref  # LoRAX's spelling of the same version
    assert AdapterRef.parse("team/x@weird", "local").ring_key == "team/x@weird"  # a local path keeps its '@'
    assert AdapterRef.parse("team/x", "local", "v2").key == "local:team/x@v2"
    assert AdapterRef.from_entry(ref.entry("name")) == ref
    assert ref.load_body(pin=True) == {"adapter_id": "acme/x", "adapter_source": "hub", "pin": True, "revision": "v2"}


@pytest.mark.parametrize(("adapter_id", "source", "revision", "message"), [
    ("acme/x@v1", "hub", "v2", "give one"),
    ("", "hub", None, "must not be empty"),
    (7, "hub", None, "must be a string"),
    ("acme/x", "ftp", None, "adapter_source must be one of"),
    ("acme/x", "hub", "", "revision must be"),
    ("acme/x", "hub", "r" * 256, "revision must be"),
    ("bucket/x", "s3", None, "s3://"),
])
def test_what_names_no_version_is_refused_with_the_reason(adapter_id, source, revision, message) -> None:
    with pytest.raises(ValueError, match=message):
        AdapterRef.parse(adapter_id, source, revision)


def test_the_operator_warms_the_owners_the_gateway_routes_a_pinned_revision_to() -> None:
    """The review's reproduction: an Adapter {id: acme/x, revision: v2} on four replicas was warmed (without its
    revision) on the owner of ``acme/x`` while the gateway routed the name to the owner of ``acme/x@v2``."""
    members = [f"m-replicas-{i}" for i in range(4)]
    record = AdapterRecord.from_body({"metadata": {"name": "x", "uid": "u"},
                                      "spec": {"baseModel": "m", "id": "acme/x", "source": "hub", "revision": "v2"}})
    gateway = Catalogue()
    gateway.keys = {e["name"]: AdapterRef.from_entry(e).ring_key for e in catalogue_entries({record.name: record.ref})}
    routed = ring.owners(gateway.key_for("x"), members, 1)
    assert placement(record.ref.ring_key, members, 1) == routed
    assert record.load_request() == {"adapter_id": "acme/x", "adapter_source": "hub", "pin": False, "revision": "v2"}
    assert ring.owners("acme/x", members, 1) != routed  # the case that went wrong: the bare id has another owner


def test_equal_catalogues_have_equal_versions_whatever_their_order() -> None:
    a, b = AdapterRef("hub", "a/x"), AdapterRef("local", "b", "v1")
    assert catalogue_version(catalogue_entries({"a": a, "b": b})) == catalogue_version(catalogue_entries({"b": b, "a": a}))
    assert catalogue_version(catalogue_entries({"a": a})) != catalogue_version(catalogue_entries({"a": AdapterRef("hub", "a/x", "v2")}))
