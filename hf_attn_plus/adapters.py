"""PEFT adapters over the plugin's modules: refuse to load one whose tensors would be dropped without a word.

PEFT silently skips adapter tensors whose target module is missing from the base model, which is what happens when
an adapter trained on a mechanism's `attn_plus` weights is loaded onto a model built without them (plugin not
imported, another attn_implementation, other options). Recipes and the CLI load adapters through `load_adapter`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

_PEFT_PREFIX = "base_model.model."
# Where a saved adapter key stops naming the base model's module and starts naming PEFT's own tensors.
_PEFT_PARTS = (".base_layer.", ".lora_", ".modules_to_save.", ".original_module.")


class AdapterMismatchError(ValueError):
    """An adapter targets modules or parameters the base model does not have."""


def _adapter_files(adapter: str) -> tuple[list[str], dict[str, Any]]:
    safetensors_path = os.path.join(adapter, "adapter_model.safetensors")
    if os.path.exists(safetensors_path):
        from safetensors import safe_open

        with safe_open(safetensors_path, framework="pt") as f:
            keys = list(f.keys())
    else:
        keys = list(torch.load(os.path.join(adapter, "adapter_model.bin"), map_location="meta", weights_only=True))
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        return keys, json.load(f)


def _target_path(key: str) -> str:
    path = key.removeprefix(_PEFT_PREFIX)
    cuts = [path.find(part) for part in _PEFT_PARTS if part in path]
    return path[: min(cuts)] if cuts else path  # no PEFT part: a modules_to_save tensor, named like the original


def _resolves(model: torch.nn.Module, path: str) -> bool:
    node: Any = model
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return False
    return True


def check_adapter(model: torch.nn.Module, adapter: str) -> None:
    """Raise AdapterMismatchError unless every tensor of the saved adapter in directory `adapter` has its target in
    `model` (the base model, before `PeftModel.from_pretrained`)."""
    keys, config = _adapter_files(adapter)
    missing = sorted({path for path in map(_target_path, keys) if not _resolves(model, path)})
    parameter_names = [name for name, _ in model.named_parameters()]
    missing += [
        f"parameter *.{target}"
        for target in config.get("target_parameters") or []
        if not any(name == target or name.endswith("." + target) for name in parameter_names)
    ]
    if missing:
        raise AdapterMismatchError(
            f"the adapter in {adapter!r} targets {len(missing)} module(s) or parameter(s) this model does not have, "
            f"e.g. {', '.join(missing[:3])}; PEFT would drop them silently. Weights under `attn_plus` are created by "
            "hf_attn_plus: import it and load the base model with the adapter's attn_implementation and "
            "config.hf_attn_plus options before loading the adapter"
        )


def load_adapter(model: torch.nn.Module, adapter: str, **kwargs: Any) -> torch.nn.Module:
    """`PeftModel.from_pretrained(model, adapter, **kwargs)` after `check_adapter`."""
    from peft import PeftModel

    check_adapter(model, adapter)
    return PeftModel.from_pretrained(model, adapter, **kwargs)
