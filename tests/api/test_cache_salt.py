"""Who shares prefix-cache blocks: callers under one gateway key, never two keys (the cache is a timing oracle).

The salt is the gateway's to set (a digest of the caller's key) and the replica honours it only beside the hop
token (its warm token, the gateway's credential): a caller's own salt header is stripped at the gateway and ignored
on a replica reached directly.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from support.server import RunningServer, ThreadedApp

from lorafleet.cache_salt import HOP_TOKEN_HEADER, SALT_HEADER, salt_for_key
from lorafleet.gateway.app import create_gateway_app

PROMPT = "the quarterly numbers for the northern region, as sent by the finance team on monday, are"


@pytest.fixture(scope="module")
def replica(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("salt")
    with RunningServer(tiny_models["llama"], root, root / "cache", warm_token="hop", admin_token="admin") as server:
        yield server


def hits(replica) -> int:  # noqa: ANN001
    return replica.service.engine.prefix.hit_tokens


def ask(url: str, headers: dict[str, str]) -> int:
    response = httpx.post(url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return int(response.headers["x-prompt-tokens"])


def test_the_replica_shares_blocks_only_within_one_trusted_salt(replica) -> None:
    salted = {SALT_HEADER: "tenant-a", HOP_TOKEN_HEADER: "hop"}
    ask(replica.url, salted)
    before = hits(replica)
    ask(replica.url, {SALT_HEADER: "tenant-b", HOP_TOKEN_HEADER: "hop"})
    assert hits(replica) == before  # another salt: computed afresh
    ask(replica.url, {SALT_HEADER: "tenant-a", HOP_TOKEN_HEADER: "wrong"})  # untrusted: the shared, unsalted partition
    ask(replica.url, {SALT_HEADER: "tenant-a"})
    shared = hits(replica)
    assert shared > before  # the two unsalted requests shared with each other, not with tenant-a
    ask(replica.url, salted)
    assert hits(replica) > shared  # the same salt: its blocks reused


def test_through_the_gateway_each_key_has_its_own_cache_and_a_callers_salt_is_stripped(replica, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("key-one\nkey-two\n")
    app = create_gateway_app([replica.url], probe_interval=0.2, api_key_file=keys, warm_token="hop")
    with ThreadedApp(app) as gateway:
        ask(gateway.url, {"authorization": "Bearer key-one"})
        before = hits(replica)
        # key-two forges key-one's salt and the hop token: both stripped, its own salt set instead.
        ask(gateway.url, {"authorization": "Bearer key-two", SALT_HEADER: salt_for_key("key-one"), HOP_TOKEN_HEADER: "hop"})
        assert hits(replica) == before
        ask(gateway.url, {"authorization": "Bearer key-one"})
        assert hits(replica) > before
