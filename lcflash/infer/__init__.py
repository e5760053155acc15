"""Inference: latent KV cache, absorbed-MLA decode, batched generation, MTP speculative decoding."""

from lcflash.infer.cache import DecodeCache  # noqa: F401
from lcflash.infer.generation import GenerateError, Generator, generate, generator_for  # noqa: F401
