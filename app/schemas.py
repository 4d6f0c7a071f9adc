"""Request and response models of the HTTP contract (../shared/API.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from charrnn.sampling import MAX_SEED


def _no_bool(value: Any) -> Any:
    # JSON true/false are not numbers, whatever Python thinks of bool.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]

StopList = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=4)]


class GenerateRequest(BaseModel):
    """Native generation parameters (JSON body, or query parameters for GET streaming)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prime": "Alice was",
                    "max_new_chars": 200,
                    "temperature": 0.8,
                    "top_k": 5,
                    "seed": 1234,
                    "stop": ["\n\n"],
                }
            ]
        },
    )

    prime: str = Field(min_length=1, description="text to warm the model up on")
    max_new_chars: Int = Field(200, ge=1, description="characters to generate")
    temperature: Float = Field(1.0, gt=0, le=10, allow_inf_nan=False)
    top_k: Int | None = Field(None, ge=1, description="sample among the k likeliest")
    top_p: Float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="nucleus mass")
    seed: Int | None = Field(None, ge=0, lt=MAX_SEED, description="null: the server picks")
    stop: StopList = Field(default_factory=list, description="end when the text ends with one")
    model: str | None = Field(None, description="a loaded model; null: the default")


class Usage(BaseModel):
    prime_chars: int
    generated_chars: int


class Timings(BaseModel):
    queue_ms: float
    warmup_ms: float
    generate_ms: float
    chars_per_s: float


class GenerateResponse(BaseModel):
    model: str
    prime: str
    generated_text: str
    finish_reason: Literal["length", "stop"]
    seed: int
    usage: Usage
    timings: Timings


class StreamStart(BaseModel):
    model: str
    seed: int
    prime_chars: int


class StreamToken(BaseModel):
    index: int
    text: str


class StreamDone(BaseModel):
    generated_text: str
    finish_reason: Literal["length", "stop"]
    seed: int
    usage: Usage
    timings: Timings


class StreamError(BaseModel):
    message: str
    type: str


# -- operations ---------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready", "loading", "shutting_down"]
    models: dict[str, bool] = Field(default_factory=dict)


class Architecture(BaseModel):
    cell: str
    layers: int
    hidden: int
    embed: int
    vocab_size: int


class ModelInfo(BaseModel):
    name: str
    default: bool
    path: str
    vocabulary: str
    parameters: int
    architecture: Architecture
    metrics: dict[str, Any]
    device: str
    dtype: str
    decode_weights: Literal["fp32", "int8"] = Field(
        description="precision of the weights in the decode step"
    )
    decode_kernels: Literal["native", "eager"] = Field(
        description="what runs the decode step: the C++ LSTM kernels, or the reference kernels "
        "op by op (CUDA replays these from CUDA graphs)"
    )
    decode_reason: str = Field(description="why the decode step runs in this precision")
    batch_invariant: bool = Field(
        description="whether a request's text is the same alone or among other requests"
    )
    batch_invariance: str = Field(description="why it is or is not")


class Limits(BaseModel):
    max_prime_chars: int
    max_new_chars_limit: int
    max_concurrent: int
    max_queue: int
    max_body_bytes: int
    auth_required: bool


class Info(BaseModel):
    models: list[ModelInfo]
    limits: Limits


# -- OpenAI-compatible ----------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completions request that a character model can honour.
    Other OpenAI fields are accepted and ignored, as clients send them by default."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "alice",
                    "prompt": "Alice",
                    "max_tokens": 100,
                    "temperature": 0.8,
                    "stream": False,
                }
            ]
        },
    )

    model: str | None = None
    prompt: str | list[str] = Field(description="one prompt (a list of one is accepted)")
    max_tokens: Int | None = Field(16, ge=1, description="characters to generate")
    temperature: Float | None = Field(1.0, ge=0, le=10, allow_inf_nan=False)
    top_p: Float | None = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: Int | None = Field(None, ge=1, description="extension: sample among the k likeliest")
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=0, lt=MAX_SEED)
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["length", "stop"] | None
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "charrnn"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody
