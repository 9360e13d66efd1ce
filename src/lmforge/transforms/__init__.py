"""Model transforms: functions nn.Module -> nn.Module that work in place and keep the base parameter names,
so base checkpoints load unchanged into a transformed model."""

from __future__ import annotations

from torch import nn

from .calibrate import calibrate_sequential
from .gptq import gptq_quantize
from .lora import LoraConfig, LoRALinear, adapter_names, apply_lora, merge_lora, set_adapter, unmerge_lora, unwrap_lora
from .peft import load_adapter, save_adapter
from .quant import QuantLinear, quantization_config, quantize_rtn, save_quantized
from .quantize import NF4Linear, dequantize_nf4, quantize_nf4

__all__ = ["count_parameters", "LoraConfig", "LoRALinear", "apply_lora", "set_adapter", "merge_lora",
           "unmerge_lora", "unwrap_lora", "adapter_names", "save_adapter", "load_adapter", "NF4Linear",
           "quantize_nf4", "dequantize_nf4", "QuantLinear", "quantize_rtn", "quantization_config", "save_quantized",
           "gptq_quantize", "calibrate_sequential"]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantized layer counts the weights it represents, not its bytes."""
    params = list(model.parameters())  # each shared tensor once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    quantized = sum(getattr(getattr(m, "base_layer", m), "num_quantized_weights", 0) for m in model.modules())
    return trainable, sum(p.numel() for p in params) + quantized
