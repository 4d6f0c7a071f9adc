"""Service settings, read from ``CHARRNN_*`` environment variables."""

from __future__ import annotations

import os
from functools import cached_property
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# The least ``stream_backlog``: what one hand-over of the decode thread can bring a reader at
# full speed (the engine checks its own numbers against it).
MIN_BACKLOG = 512


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class Settings(BaseSettings):
    # Variables win over the file named by CHARRNN_ENV_FILE (a mounted ConfigMap, say), which
    # SIGHUP reads again.
    model_config = SettingsConfigDict(
        env_prefix="CHARRNN_", extra="ignore", env_file=os.environ.get("CHARRNN_ENV_FILE")
    )

    models: str = Field(
        "alice=models/alice.pt",
        description="comma-separated name=path pairs; the first is the default model",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_concurrent: int = Field(64, ge=1, description="generations in the batch at once")
    max_queue: int = Field(256, ge=0, description="generations waiting for a batch slot")
    max_n: int = Field(16, ge=1, description="samples one request may ask for (n, best_of)")
    max_prime_chars: int = Field(4096, ge=1)
    max_new_chars_limit: int = Field(10000, ge=1)
    max_score_chars: int = Field(
        100_000, ge=1, description="longest text POST /score takes (its body limit follows)"
    )
    max_body_bytes: int = Field(65536, ge=1024, description="larger request bodies get 413")
    prime_cache_size: int = Field(256, ge=0, description="primes whose warmed-up state is kept")
    stream_backlog: int = Field(
        8192,
        ge=MIN_BACKLOG,
        description="characters a slow client may fall behind before it is cut off (at least "
        "what one hand-over of the decode thread can bring a reader at full speed)",
    )
    prime_budget: int = Field(
        512,
        ge=1,
        description="prime positions run per decode iteration, over all primes in progress: "
        "a burst of long primes then delays streaming rows by one budget's work at most",
    )
    prime_slice_ms: float = Field(
        12.0,
        gt=0,
        description="and at most about this long per decode iteration, however many positions "
        "the budget allows (a slower or busier CPU takes longer per position)",
    )
    unknown_chars: Literal["error", "replace", "drop"] = Field(
        "error",
        description="what a generation does with prime characters outside the vocabulary, "
        "where the request does not say: refuse them (422), replace them by look-alikes, or "
        "drop them",
    )
    constraint_compile_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="longest a request's constraint may take to compile (beyond it: 422); "
        "compiled constraints are cached",
    )
    api_keys: str = Field("", description="comma-separated bearer keys; empty = no auth")
    admin_keys: str = Field(
        "",
        description="comma-separated bearer keys of the /admin routes (load, swap, unload "
        "models at run time); empty: the routes do not exist",
    )
    model_dir: str = Field(
        "models", description="the folder the /admin routes load checkpoints from"
    )
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS")
    threads: int = Field(
        default_factory=lambda: max(1, (os.cpu_count() or 2) // 2),
        ge=1,
        description="torch CPU threads for the model (default: half the cores, so that HTTP "
        "keeps the rest)",
    )
    decode_weights: Literal["auto", "fp32", "int8"] = Field(
        "auto",
        description="precision of the decode step's matmuls; auto: int8 on the CPU, fp32 on "
        "CUDA (int8 is CPU-only)",
    )
    native_kernels: bool = Field(
        True,
        description="run an LSTM's decode step (and an int8 prime) with the native C++ kernels "
        "(built on first use with a C++ compiler, or prebuilt; charrnn/native.py); false or "
        "unavailable: the eager reference kernels",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="how long open generations may run on after SIGTERM"
    )
    log_level: str = "info"

    @cached_property
    def model_paths(self) -> dict[str, str]:
        pairs: dict[str, str] = {}
        for item in _csv(self.models):
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"CHARRNN_MODELS entry {item!r} is not name=path")
            pairs[name.strip()] = path.strip()
        if not pairs:
            raise ValueError("CHARRNN_MODELS names no model")
        return pairs

    @property
    def score_body_bytes(self) -> int:
        """The body limit of ``POST /score``: a text of ``max_score_chars`` and a context of
        ``max_prime_chars`` characters, each written as a JSON escape of up to 12 bytes
        (a surrogate pair), and room for the other fields."""
        return max(self.max_body_bytes, 12 * (self.max_score_chars + self.max_prime_chars) + 4096)

    @cached_property
    def api_key_list(self) -> list[str]:
        return _csv(self.api_keys)

    @cached_property
    def admin_key_list(self) -> list[str]:
        return _csv(self.admin_keys)

    @cached_property
    def cors_origin_list(self) -> list[str]:
        return _csv(self.cors_origins)
