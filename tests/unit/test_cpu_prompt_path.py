"""The CPU prompt path (inference/cpu.py) on a CPU without native bf16: the bf16 block layers of a prompt chunk
are widened, one after another, into one shared float32 buffer and multiplied in float32."""

from __future__ import annotations

import pytest
import torch

from lmforge.inference import cpu
from lmforge.models import ModelConfig, Transformer
from lmforge.precision import NATIVE_BF16


@pytest.mark.skipif(NATIVE_BF16, reason="this CPU multiplies bf16 natively: prompt chunks use packed bf16 weights")
def test_prompt_chunk_widens_into_one_buffer_and_agrees_with_the_plain_bf16_forward():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=160, qkv_bias=True)
    model = Transformer(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 96, (1, cpu.WIDEN_ROWS + 8))
    packed = cpu.PackedWeights(model)
    with torch.no_grad():
        ref = model(ids).logits.float()  # (1, T, V): bf16 GEMMs, the same products and float32 sums
        with packed.installed():
            got = model(ids).logits.float()
            buf = packed.scratch.buf
            again = model(ids).logits.float()
    # the largest block layer (gate and up stacked, 2 x 160 rows) sized the buffer; the second pass reused it
    assert buf.numel() == 2 * 160 * 64 and packed.scratch.buf.data_ptr() == buf.data_ptr()
    assert torch.equal(got, again)
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
