"""The wheel works outside the checkout: built, installed into a fresh environment, run from a temporary folder.

`lorafleet up` used to find the CRDs through the source tree (``parents[2]``), which a wheel or the image
does not have. The fresh environment borrows this one's dependencies through a path file (installing them
again would need the network) but not its editable lorafleet: a ``.pth`` inside a borrowed folder is not
processed, so the only lorafleet it can import is the wheel's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_runs_kube_api_and_up_from_anywhere(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-P", "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    wheel = next(wheels.glob("lorafleet-*.whl"))
    env_dir = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-P", "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()

    def run(*code_or_args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), "-P", *code_or_args], capture_output=True, text=True, timeout=timeout, cwd=workdir)

    where = run("-c", "import json, lorafleet; from lorafleet.local.up import packaged_crds; "
                      "print(json.dumps([lorafleet.__file__, sorted(p.name for p in packaged_crds().iterdir())]))")
    assert where.returncode == 0, where.stderr
    module, crds = json.loads(where.stdout)
    assert module.startswith(str(site)), f"imported {module}, not the wheel"
    assert {"adapters.yaml", "basemodels.yaml", "tenants.yaml"} <= set(crds)
    assert run("-m", "lorafleet", "up", "--help").returncode == 0
    # kube-api with the packaged CRDs, from the wheel: starts, serves the kinds, stops on SIGTERM.
    kubeconfig = workdir / "kubeconfig"
    process = subprocess.Popen([str(python), "-P", "-m", "lorafleet", "kube-api", "--port", "0", "--kubeconfig", str(kubeconfig),
                                "--crds", str(Path(site) / "lorafleet" / "crds")], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        for line in process.stdout:  # the first line says where it listens
            if "http://" in line:
                break
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        import httpx

        kinds = {r["kind"] for r in httpx.get(url + "/apis/lorafleet.io/v1alpha1", timeout=10).json()["resources"]}
        assert {"BaseModel", "Adapter"} <= kinds
    finally:
        process.terminate()
        process.wait(30)
