"""PEFT-format adapter export and import.

An adapter trained here can be loaded wherever Hugging Face PEFT adapters load
(``PeftModel.from_pretrained``, transformers' ``load_adapter``, serving stacks), and a PEFT LoRA or
DoRA adapter can be loaded into a model here. A PEFT adapter directory holds two files:

- ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
  ``use_rslora``, ``use_dora``, ``fan_in_fan_out`` and the per-layer ``rank_pattern`` /
  ``alpha_pattern``;
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and
  ``...lora_B.weight`` ``(out, r)`` for linear layers (GPT-2's ``Conv1D`` too: PEFT stores its
  factors in ``(out, in)`` orientation and sets ``fan_in_fan_out``), ``...lora_embedding_A``
  ``(r, num_embeddings)`` and ``...lora_embedding_B`` ``(embedding_dim, r)`` for embeddings,
  ``...lora_magnitude_vector`` ``(out,)`` for DoRA, and the full weights of ``modules_to_save``
  (e.g. a classifier head) under ``base_model.model.<module>.<parameter>``.

PEFT's layer computes ``base(x) + s * B @ A x`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``), per layer ``r`` and ``lora_alpha`` taken from the patterns when they match. Every
method whose update is a product of two factors maps onto that exactly.

Module names: PEFT names modules relative to the transformers model it wraps. A model here is often
a LightningModule holding that model as an attribute (``self.model``), so by default names are taken
relative to the outermost transformers ``PreTrainedModel`` inside ``model`` (``model`` itself when it
is one, or when it holds none); pass ``root="model"`` (a submodule name, ``""`` for ``model``
itself) to choose another.

The package: ``names.py`` (the root and PEFT's name patterns), ``export.py`` (each layer's
``AdapterLayer.peft_form()`` assembled into one config), ``files.py`` (reading and checking a
directory) and ``importing.py`` (planning and injecting an import).
"""

from __future__ import annotations

from lightning_lowrank.methods.base import PeftExportError, PeftLayer
from lightning_lowrank.peft.export import export_peft, peft_adapter
from lightning_lowrank.peft.files import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, read_peft
from lightning_lowrank.peft.importing import import_peft

__all__ = [
    "CONFIG_NAME",
    "KEY_PREFIX",
    "WEIGHTS_NAME",
    "PeftExportError",
    "PeftLayer",
    "export_peft",
    "import_peft",
    "peft_adapter",
    "read_peft",
]
