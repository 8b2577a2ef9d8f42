"""Validation reads the allowed names from the modules that implement each choice, without
importing kernel code."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Validation runs before anything is loaded; none of these may be imported by it.
KERNEL_MODULES = ("kernels.attention_pallas", "kernels.attention_mgpu", "jax.experimental.pallas")

PROBE = """
import json, sys
from tests.conftest import TINY_MODEL
from toolkit.config.schema import RoleConfig, RunConfig, TransferConfig
from toolkit.config.validate import validate
validate(RunConfig(model=TINY_MODEL))
validate(RunConfig(model=TINY_MODEL, role=RoleConfig(name="prefill"), transfer=TransferConfig(backend="nixl")))
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("kernels.", "jax.experimental.pallas", "jax._src.pallas")))))
"""


def test_validate_imports_no_kernel_code():
    """Guards against config validation importing the Pallas kernels (and with them the
    Triton lowering and Mosaic GPU) just to read a tuple of backend names."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    bad = [m for m in loaded if m.startswith((*KERNEL_MODULES, "jax._src.pallas"))]
    assert not bad, f"validation imported kernel code: {bad}"


def test_allowed_names_come_from_the_implementing_modules():
    """Guards against a second copy of a list of names that drifts from the code that
    implements the choices (the model sources were written twice)."""
    from kernels import attention
    from toolkit.cache import policies, pool
    from toolkit.config import validate as V
    from toolkit.disagg import choices
    from toolkit.models import loader, spec

    assert V.ATTENTION_CHOICES is attention.CHOICES
    assert V.KV_ALLOC is pool.KV_ALLOC and V.LAYER_LOOPS is spec.LAYER_LOOPS
    assert V.MODEL_SOURCES is loader.SOURCES
    assert V.CACHE_POLICIES is policies.CACHE_POLICIES
    assert V.TRANSFER_BACKENDS is choices.TRANSFER_BACKENDS
    assert set(choices.PD_ROLES) < set(V.ROLES)

