"""``lorafleet serve``: load the model, start the engine, serve HTTP until SIGTERM, drain, exit 0."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("lorafleet.serve")


def resolve_model_folder(model: str, source: str, revision: str | None) -> Path:
    """A known name (smollm2), a local folder, or a hub repo id downloaded with huggingface_hub."""
    from lorafleet import model_store

    if source in ("auto", "local") and (model in model_store.KNOWN_MODELS or Path(model).is_dir()):
        return model_store.resolve_model(model)
    if source == "local":
        raise FileNotFoundError(f"--model {model!r} is not a folder")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, revision=revision, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from lorafleet.http_limits import server_config
    from lorafleet.server.api.app import create_app
    from lorafleet.server.api.service import ReplicaService
    from lorafleet.server.errors import Unhealthy
    from lorafleet.server.serve_config import serve_config_from_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        folder = resolve_model_folder(args.model_id, args.model_source, args.revision)
        config = serve_config_from_args(args, folder)
        config.engine.validate()
    except (FileNotFoundError, ValueError) as exc:
        print(f"lorafleet serve: {exc}", file=sys.stderr)
        return 2
    if config.admin_token is None and config.admin_open:
        log.warning("--admin-open without --admin-token: anyone who can reach this replica may load, pin, unload and warm adapters")
    elif config.admin_token is None:
        log.info("no --admin-token (LORAFLEET_ADMIN_TOKEN): admin routes (load, pin, unload) are refused")
    log.info("loading %s from %s", args.model_id, folder)
    service = ReplicaService(config)
    app = create_app(service)

    class DrainingServer(uvicorn.Server):
        """SIGTERM: /health turns 503 and new requests get 503 at once; running ones finish (up to the grace period)."""

        def handle_exit(self, sig: int, frame: object) -> None:
            if service.draining:
                return super().handle_exit(sig, frame)
            service.draining = True
            log.info("shutting down: draining %d requests (grace %.0fs)", service.in_flight, config.grace_period_s)
            threading.Thread(target=self._drain, daemon=True).start()

        def _drain(self) -> None:
            deadline = time.monotonic() + config.grace_period_s
            while service.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            if service.in_flight > 0:
                # Past the grace period: what still runs ends now with a 503, which a gateway retries on
                # another replica, instead of a connection cut when the pod is killed.
                log.warning("grace period over: ending %d requests with 503", service.in_flight)
                service.runner.abort_all(Unhealthy("the replica shut down before this request finished; retry it"))
                until = time.monotonic() + 3.0
                while service.in_flight > 0 and time.monotonic() < until:
                    time.sleep(0.05)
            self.should_exit = True

    server = DrainingServer(server_config(app, config.host, config.port, log_level="info", timeout_graceful_shutdown=5))
    server.run()
    return 0
