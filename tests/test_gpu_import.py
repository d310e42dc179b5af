"""`appliance.gpu` runs on hosts with nothing but Python and nvidia-ml-py (Ansible's targets)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.harness import REPO, clean_env

# Forbid every module outside the standard library except pynvml and the package itself.
BLOCKER = """
import importlib.abc, json, sys
ALLOWED = set(sys.argv[1:])
before = set(sys.modules)  # what the interpreter's startup (site, .pth files) loaded

class StdlibOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in ALLOWED:
            return None
        raise ImportError(f"blocked non-stdlib import: {name}")

sys.meta_path.insert(0, StdlibOnly())
import appliance.gpu
from appliance.gpu import health_report
code, verdict = health_report()
loaded = sorted({m.partition(".")[0] for m in set(sys.modules) - before})
result = {"code": code, "status": verdict["status"], "reasons": verdict["reasons"], "loaded": loaded}
print(json.dumps(result))
"""


def run_blocked(*allowed: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER, *allowed],
        env=clean_env(),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_gpu_package_imports_with_stdlib_and_pynvml_only():
    result = run_blocked("appliance", "pynvml")
    # No GPU here: a verdict, not an exception.
    assert result["code"] == 2
    assert result["status"] == "unavailable"
    third_party = {m for m in result["loaded"] if m not in sys.stdlib_module_names}
    assert third_party == {"appliance", "pynvml"}, third_party


def test_without_nvidia_ml_py_the_verdict_is_unavailable_not_an_import_error():
    result = run_blocked("appliance")
    assert result["code"] == 2
    assert result["reasons"] == [
        "the nvidia-ml-py Python package (pynvml) is not installed: `pip install nvidia-ml-py`"
    ]
