from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="msn",
    version="0.1.0",
    description=(
        "Make Some Noise: MSN noisy fine-tuning and lossless TR-Jacobi decoding "
        "for Llama-family models, with fused Triton kernels"
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["msn", "msn.*", "msn_kernels", "msn_kernels.*"]),
    include_package_data=True,
    package_data={"msn": ["assets/*", "assets/**/*"], "msn_kernels": ["csrc/*.cpp"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.43",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "huggingface_hub>=0.23",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "gguf>=0.10",
    ],
    extras_require={
        "train": ["accelerate>=0.26", "peft>=0.10"],
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6.90",
            "ruff>=0.5",
            "accelerate>=0.26",
            "peft>=0.10",
        ],
    },
    entry_points={"console_scripts": ["msn=msn.cli:main"]},
)
