"""Plain pytest from the repository root: generate proto/'s Python code first.

Bazel builds that code itself (//proto:policy_engine_v1); this file is not part of any
Bazel target. Plain pytest gets the same modules from generated/python/ (ignored by
git), regenerated only when a .proto file is newer than its output. PYTHONPATH carries
the folder to the processes tests start (engines, control planes).
"""

from __future__ import annotations

import os
import sys

from tools.protoc.gen_protos import ensure_generated

_GENERATED = str(ensure_generated())
sys.path.insert(0, _GENERATED)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_GENERATED, os.environ.get("PYTHONPATH", "")) if p
)
