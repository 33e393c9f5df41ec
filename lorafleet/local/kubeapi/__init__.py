"""An embedded Kubernetes API for tests and ``lorafleet up`` (KMock's emulator, made faithful)."""

from lorafleet.local.kubeapi.runner import EmbeddedKubeAPI

__all__ = ["EmbeddedKubeAPI"]
