"""LoRA adapters the way Kaito attaches them: discovery, checks and the combined adapter.

Kaito mounts each adapter of a Workspace at ``/mnt/adapter/<name>`` and sets an
environment variable NAMED AFTER THE ADAPTER to its strength. Its transformers server
(presets/workspace/inference/text-generation/inference_api.py) loads every
subdirectory holding ``adapter_config.json`` with PEFT and combines them with
``add_weighted_adapter(adapters, strengths, combination_type)`` into one adapter used
for every /chat request. This module finds the same adapters and builds the same
combination, once, at start-up; the engines then serve each adapter and the combined
one by name (docs/ADAPTERS.md).

Unlike Kaito, configuration mistakes stop start-up with a message naming the directory
or variable (a subdirectory without ``adapter_config.json``, a rank the engine cannot
serve, a strength outside [0, 1], two adapters whose names clash): nothing half-loads.

Discovery is pure (a directory and an environment in, a list out); only
``build_combined`` imports torch and PEFT.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# vLLM's accepted max_lora_rank values (vllm.config.lora.MaxLoRARanks; a unit test
# keeps them equal).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# PEFT's combination types that need nothing but the adapters and their weights. The
# others (ties, dare_*, magnitude_prune*) need a `density` that Kaito never passes, so
# PEFT would refuse them there too.
COMBINATIONS = ("svd", "linear", "cat")

CONFIG_FILE = "adapter_config.json"


class AdapterError(ValueError):
    """An adapter configuration the server refuses; the message names the directory or
    the variable to fix."""


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    rank: int
    # Kaito's strength: the weight of this adapter in the combined default adapter.
    strength: float


def adapter_rank(config: Mapping[str, Any]) -> int:
    """The largest rank an adapter uses (``r``, or a bigger one in ``rank_pattern``),
    as PEFT counts it when it allocates a combination."""
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks)


def combined_rank(ranks: Sequence[int], combination: str) -> int:
    """The rank of PEFT's ``add_weighted_adapter`` result (peft LoraModel.
    _check_add_weighted_adapter): one adapter is combined linearly; linear keeps the
    common rank, cat sums them, svd keeps the largest."""
    if len(ranks) == 1 or combination == "svd":
        return max(ranks)
    if combination == "cat":
        return sum(ranks)
    return ranks[0]  # linear: every rank is the same (checked in discover_adapters)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise AdapterError(
        f"LoRA rank {rank} is larger than vLLM serves (max_lora_rank at most {VLLM_LORA_RANKS[-1]})"
    )


def parse_strength(name: str, environ: Mapping[str, str]) -> float:
    """Kaito's ``float(os.getenv(adapter_name, '1.0'))``, refused outside [0, 1]."""
    text = environ.get(name)
    if text is None:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise AdapterError(
            f"the strength of adapter {name!r} (environment variable {name}) must be a number "
            f"in [0, 1], got {text!r}"
        )
    return value


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{path}: peft_type must be LORA, got {config.get('peft_type')!r}")
    return config


def discover_adapters(
    adapters_dir: Path,
    environ: Mapping[str, str],
    combination: str = "svd",
    base_name: str | None = None,
) -> list[Adapter]:
    """Every adapter under ``adapters_dir`` (KAITO_ADAPTERS_DIR), sorted by name; an
    empty list when the directory does not exist (Kaito's rule: the base model alone).

    Raises AdapterError for anything the server would not serve as configured.
    """
    where = f"KAITO_ADAPTERS_DIR={adapters_dir}"
    if not adapters_dir.exists():
        return []
    if not adapters_dir.is_dir():
        raise AdapterError(f"{where} is not a directory")
    if combination not in COMBINATIONS:
        raise AdapterError(
            f"KAITO_ADAPTER_COMBINATION must be one of {list(COMBINATIONS)}, got {combination!r}"
        )
    adapters: list[Adapter] = []
    seen: dict[str, str] = {}
    if base_name is not None:
        seen[base_name.casefold()] = f"the base model's served name {base_name!r}"
    for entry in sorted(adapters_dir.iterdir(), key=lambda p: p.name):
        if not entry.is_dir() or entry.name.startswith("."):
            # Files and hidden directories (Kubernetes' ..data links of a mounted volume)
            # are not adapters.
            continue
        if not (entry / CONFIG_FILE).is_file():
            # Kaito skips such a directory silently; an adapter that was meant to load
            # and did not is worse than a refused start.
            raise AdapterError(
                f"{entry} (in {where}) has no {CONFIG_FILE}: it is not a PEFT LoRA adapter; "
                "remove it or add the adapter's files"
            )
        key = entry.name.casefold()
        if key in seen:
            raise AdapterError(
                f"adapter {entry.name!r} ({entry}) clashes with {seen[key]}: requests select "
                "adapters by name, case-insensitively unique names are required"
            )
        seen[key] = f"adapter directory {entry}"
        config = _read_config(entry)
        rank = adapter_rank(config)
        if rank > VLLM_LORA_RANKS[-1]:
            raise AdapterError(
                f"{entry / CONFIG_FILE}: LoRA rank {rank} is larger than vLLM serves "
                f"(at most {VLLM_LORA_RANKS[-1]})"
            )
        adapters.append(Adapter(entry.name, entry, rank, parse_strength(entry.name, environ)))
    if len(adapters) > 1 and combination == "linear" and len({a.rank for a in adapters}) > 1:
        ranks = {a.name: a.rank for a in adapters}
        raise AdapterError(
            f"KAITO_ADAPTER_COMBINATION=linear needs adapters of one rank, got {ranks}: "
            "use svd or cat"
        )
    if adapters:
        needed = combined_rank([a.rank for a in adapters], combination)
        if needed > VLLM_LORA_RANKS[-1]:
            raise AdapterError(
                f"KAITO_ADAPTER_COMBINATION={combination} makes a combined adapter of rank "
                f"{needed}, larger than vLLM serves (at most {VLLM_LORA_RANKS[-1]}): use svd"
            )
    return adapters


def _meta_free_base(model: str) -> Any:
    """The base model's module tree with no weights in memory.

    Combining adapters reads only LoRA tensors, but PEFT wraps a real model and puts
    each new adapter on its base layer's device: a model on the meta device would get a
    meta combination (nothing computed). So the model is built on meta, then every
    weight becomes a zero expanded to its shape: a real CPU tensor holding one number,
    not a second copy of the weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for module in base.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            empty = torch.zeros((), dtype=torch.float32).expand(param.shape)
            setattr(module, name, torch.nn.Parameter(empty, requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device.type == "meta":
                module.register_buffer(name, torch.zeros(buffer.shape, dtype=buffer.dtype))
    return base


COMBINED = "combined_adapter"  # Kaito's name for it


def combine_with_peft(base: Any, adapters: Sequence[Adapter], combination: str) -> Any:
    """Kaito's combination: PEFT loads every adapter, then add_weighted_adapter."""
    from peft import PeftModel

    first, *rest = adapters
    model = PeftModel.from_pretrained(base, str(first.path), adapter_name=first.name)
    for adapter in rest:
        model.load_adapter(str(adapter.path), adapter_name=adapter.name)
    model.add_weighted_adapter(
        adapters=[a.name for a in adapters],
        weights=[a.strength for a in adapters],
        adapter_name=COMBINED,
        combination_type=combination,
    )
    return model


def _content_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(directory).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_combined(
    model: str, adapters: Sequence[Adapter], combination: str, out_root: Path | None = None
) -> Path:
    """Saves Kaito's combined adapter (PEFT) under ``out_root`` in a directory named
    after a hash of its content, and returns that directory.

    The name changes whenever the weights do, so an engine that caches by adapter name
    (vLLM's prefix cache keys blocks by LoRA name) never serves old and new weights
    under one name.
    """
    out_root = out_root or Path(tempfile.gettempdir()) / "kaito-adapters"
    out_root.mkdir(parents=True, exist_ok=True)
    peft_model = combine_with_peft(_meta_free_base(model), adapters, combination)
    staging = Path(tempfile.mkdtemp(dir=out_root, prefix=".staging-"))
    try:
        peft_model.save_pretrained(str(staging), selected_adapters=[COMBINED])
        saved = staging / COMBINED
        # base_model_name_or_path is None for a model built from its config; keep the
        # adapter pointing at the model it was made for.
        config_path = saved / CONFIG_FILE
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = model
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        final = out_root / f"combined-{_content_hash(saved)}"
        if not final.exists():
            os.replace(saved, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class ServedAdapters:
    """The adapters a server serves: each one by its name, and the combined default."""

    adapters: tuple[Adapter, ...] = ()
    combination: str = "svd"
    # The combined adapter's directory (its name is the directory's: combined-<hash>).
    combined: Path | None = None

    def __bool__(self) -> bool:
        return bool(self.adapters)

    @property
    def default(self) -> str | None:
        """The adapter a /chat request without ``model`` uses (Kaito's combination)."""
        return self.combined.name if self.combined is not None else None

    def paths(self) -> dict[str, Path]:
        """Every servable adapter name -> its directory, the combined one last."""
        out = {a.name: a.path for a in self.adapters}
        if self.combined is not None:
            out[self.combined.name] = self.combined
        return out

    def lora_id(self, name: str) -> int:
        """vLLM's LoRA id for an adapter: 1..N in name order, as vLLM's OpenAI layer
        numbers the modules it is given in the same order, then the combined one."""
        return list(self.paths()).index(name) + 1

    def max_lora_rank(self) -> int:
        ranks = [a.rank for a in self.adapters]
        return vllm_max_lora_rank(max(*ranks, combined_rank(ranks, self.combination)))


NO_ADAPTERS = ServedAdapters()


class UnknownModel(LookupError):
    """A request named a model that is neither the base model nor an adapter."""


def select_adapter(model: str | None, served: ServedAdapters, base_name: str) -> str | None:
    """The adapter a request runs with, None for the base model.

    ``model`` absent: the combined default (None without adapters); the base model's
    served name: no adapter; an adapter's name: that adapter alone.
    """
    if model is None:
        return served.default
    if model == base_name:
        return None
    if model in served.paths():
        return model
    raise UnknownModel(model)


def prepare_adapters(
    adapters_dir: Path,
    combination: str,
    model: str,
    base_name: str,
    environ: Mapping[str, str] | None = None,
    out_root: Path | None = None,
) -> ServedAdapters:
    """Discovery, then Kaito's combination built with PEFT; NO_ADAPTERS when there are none."""
    found = discover_adapters(
        adapters_dir, os.environ if environ is None else environ, combination, base_name
    )
    if not found:
        return NO_ADAPTERS
    combined = build_combined(model, found, combination, out_root)
    return ServedAdapters(tuple(found), combination, combined)


def load_into_peft(model: Any, served: ServedAdapters) -> Any:
    """The transformers backend's model holding every served adapter by name (the
    combined default from the same directory vLLM loads), or ``model`` itself without
    adapters."""
    if not served:
        return model
    from peft import PeftModel

    paths = list(served.paths().items())
    (first, first_path), rest = paths[0], paths[1:]
    peft_model = PeftModel.from_pretrained(model, str(first_path), adapter_name=first)
    for name, path in rest:
        peft_model.load_adapter(str(path), adapter_name=name)
    peft_model.eval()
    return peft_model


@contextlib.contextmanager
def active_adapter(model: Any, adapter: str | None) -> Iterator[None]:
    """Runs the block with ``adapter`` active on a load_into_peft model (None: the base
    model, adapters disabled). The transformers backend runs one batch at a time and a
    batch holds one adapter's requests (hf_engine.batch_key), so switching the active
    adapter per batch is safe there."""
    # A PeftModel, not any transformers model: those have set_adapter too (transformers'
    # own PEFT integration), but no disable_adapter.
    if not hasattr(model, "disable_adapter"):
        if adapter is not None:
            raise ValueError(f"adapter {adapter!r} asked of a model without adapters")
        yield
        return
    if adapter is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(adapter)
        yield
