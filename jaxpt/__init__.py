"""jaxpt: post-training for language models in pure JAX (SFT, DPO, reward modelling, KTO, GRPO, RLOO)."""

__version__ = "0.1.0"
