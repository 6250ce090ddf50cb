"""`.ci/pip_check.py`: pip check that tolerates exactly the documented protobuf override, and nothing else."""

from __future__ import annotations

import importlib.util
import subprocess

import pytest
from conftest import ROOT

KNOWN = "descript-audiotools 0.7.2 has requirement protobuf<3.20,>=3.9.2, but you have protobuf 7.36.2."
OTHER = "ray 2.60.0 has requirement protobuf>=3.20.3, but you have protobuf 3.19.6."


@pytest.fixture
def pip_check(monkeypatch):
    """The script's ``main``, with ``pip check`` answering what the test sets in ``answer``."""
    spec = importlib.util.spec_from_file_location("pip_check", ROOT / ".ci" / "pip_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    answer: list[str] = []

    def fake_run(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1 if answer else 0, "\n".join(answer) + "\n", "")

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    return module.main, answer


def test_only_the_documented_override_is_tolerated(pip_check):
    main, answer = pip_check
    assert main() == 0  # nothing broken
    answer[:] = [KNOWN]
    assert main() == 0
    answer[:] = [KNOWN, OTHER]
    assert main() == 1
    answer[:] = [KNOWN.replace("protobuf<3.20", "protobuf<3.21")]  # another pin than the documented one
    assert main() == 1
