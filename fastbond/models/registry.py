"""The policy form of a run: one line per form in `FORMS`, and `make_form`."""

from __future__ import annotations

from collections.abc import Callable

from fastbond.models.form import PolicyForm
from fastbond.models.full import FullForm


def _lora_form() -> PolicyForm:
    from fastbond.lora import LoraForm

    return LoraForm()


FORMS: dict[str, Callable[[], PolicyForm]] = {"full": FullForm, "lora": _lora_form}


def form_name(config) -> str:
    """A config's form: LoRA adapters when model.lora.r > 0, else the full policy."""
    return "lora" if config.model.lora.r > 0 else "full"


def make_form(config) -> PolicyForm:
    return FORMS[form_name(config)]()
