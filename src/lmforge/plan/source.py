"""The `ModelConfig` a plan is for, read without weights: a preset name, a config file (our fields or a Hugging
Face config.json, JSON or YAML), a model folder (its config.json only), a .gguf file (its metadata only), or a
local alias of a real checkpoint."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..models.presets import PRESETS, preset
from ..models.transformer import ModelConfig

__all__ = ["model_config"]


def _from_mapping(d: dict[str, Any], where: str) -> ModelConfig:
    """Our ModelConfig fields, or a Hugging Face config (it has model_type)."""
    from ..models import hf

    if "model_type" in d or "architectures" in d:
        return hf.config_from_hf(d, where)
    if isinstance(d.get("model"), dict):  # a recipe-style file with a model: section
        d = d["model"]
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: not a model config ({e}); expected ModelConfig fields or a Hugging Face "
                         f"config.json") from None


def _from_gguf(path: Path) -> ModelConfig:
    """The config a GGUF file's metadata describes (no tensor is read)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'lmforge[gguf]'") from None
    from ..models.gguf import config_from_gguf

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as e:
        raise InputError(f"{path}: not a readable GGUF file ({str(e)[:200]})") from None
    meta = {}
    for k, f in reader.fields.items():
        try:
            meta[k] = f.contents()
        except Exception:  # noqa: BLE001, S112 - skipped: the config check names what is missing
            continue
    return config_from_gguf(meta, path)


def _from_path(path: Path) -> ModelConfig:
    if path.is_dir():
        if (path / "config.json").exists():
            path = path / "config.json"
        else:
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise InputError(f"{path}: a model folder needs config.json (or exactly one .gguf file)")
            return _from_gguf(ggufs[0])
    if path.suffix == ".gguf":
        return _from_gguf(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not JSON ({e.msg} at line {e.lineno}); expected a model config") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of model settings, found {type(data).__name__}")
    return _from_mapping(data, str(path))


def model_config(source: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig `source` names (see the module docstring); InputError in one line when it is none of them.
    A hub id (owner/name) fetches its config.json alone."""
    if source in PRESETS:
        return preset(source, **overrides)
    path = Path(source).expanduser()
    if not path.exists() and source.count("/") == 1 and not source.startswith((".", "/", "~")):
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, "config.json"))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, no config: one line either way
            raise InputError(f"model {source!r}: no local file and its hub config.json could not be fetched "
                             f"({type(e).__name__}); expected a preset, a config file, a model folder or a .gguf")
    elif not path.exists():
        from ..models.loading import resolve

        try:
            path = resolve(source)  # a local alias (smollm2-135m-instruct, all-minilm-l6-v2)
        except FileNotFoundError as e:
            near = difflib.get_close_matches(source, PRESETS, n=1)
            hint = f"; did you mean the preset {near[0]!r}?" if near else ""
            raise InputError(f"unknown model {source!r}{hint} (expected a preset: {', '.join(PRESETS)}; a config "
                             f"file; a model folder; a .gguf file; or a local alias) [{e}]") from None
    cfg = _from_path(path)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg
