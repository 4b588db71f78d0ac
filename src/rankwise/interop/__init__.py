"""Hugging Face PEFT's adapter format, both ways, for the methods whose parameters map one to one.

:func:`to_peft` writes a rankwise adapter so that ``peft.PeftModel.from_pretrained`` loads it with
the same outputs; :func:`from_peft` adapts a model with a PEFT adapter saved by ``save_pretrained``.
Both check everything first: ``to_peft`` raises ``ValueError`` before writing, ``from_peft`` raises
``CheckpointError`` before changing the model.

    rankwise  PEFT                                   rankwise  PEFT
    lora      LORA                                   dora      LORA, use_dora=true
    c3a       C3A                                    gralora   GRALORA
    bone      MISS, init_weights=true ("balance")    bat       MISS, init_weights="bat"

``formats.py`` holds that table, ``convert.py`` the two functions. What maps field by field, and
what is refused and why: ``docs/interop.md``.
"""

from .convert import PEFT_CONFIG, PEFT_TENSORS, from_peft, to_peft
from .formats import FORMATS, Pattern, PeftFormat

__all__ = ["FORMATS", "PEFT_CONFIG", "PEFT_TENSORS", "Pattern", "PeftFormat", "from_peft", "to_peft"]
