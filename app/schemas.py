"""Request and response models of the HTTP contract (docs/api.md)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from charrnn.sampling import MAX_SEED


def _no_bool(value: Any) -> Any:
    # JSON true/false are not numbers, whatever Python thinks of bool.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


def _json_text(value: Any) -> Any:
    # A GET query carries the constraint as JSON text.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ValueError(f"must be a JSON object ({exc})") from None
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]

# Alternatives per character, at most (as OpenAI's and vLLM's logprobs).
MAX_TOP_LOGPROBS = 20

StopList = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=4)]


Breakers = Annotated[list[Annotated[str, Field(min_length=1, max_length=16)]], Field(max_length=16)]
Banned = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=64)]


def _json_list_or_object(value: Any) -> Any:
    # On GET a list or an object comes as JSON text (one query value, which FastAPI may
    # hand over as a list of one).
    if isinstance(value, list) and len(value) == 1 and str(value[0])[:1] in ("[", "{"):
        value = value[0]
    if isinstance(value, str) and value[:1] in ("[", "{"):
        return _json_text(value)
    return value


class SamplesAndControls(BaseModel):
    """Many samples from one prime, and the generation controls (docs/api.md, "Generation
    controls"): the same fields on the native and the OpenAI routes."""

    n: Int = Field(1, ge=1, description="samples from one prime (at most the server's max_n)")
    best_of: Int | None = Field(
        None,
        ge=1,
        description="draw this many samples and return the n with the highest mean logprob "
        "per character (null: n); not with streaming",
    )
    logit_bias: Annotated[dict[str, Float], BeforeValidator(_json_list_or_object)] = Field(
        default_factory=dict,
        description="added to the logits, -100 to 100 (native keys: characters; OpenAI keys: "
        "token ids as strings)",
    )
    repetition_penalty: Float = Field(
        1.0,
        gt=0,
        le=10,
        allow_inf_nan=False,
        description="a character seen in the window: a positive logit divided by it, a "
        "negative one multiplied",
    )
    presence_penalty: Float = Field(
        0.0,
        ge=-2,
        le=2,
        allow_inf_nan=False,
        description="subtracted once from the logit of each character seen in the window",
    )
    frequency_penalty: Float = Field(
        0.0,
        ge=-2,
        le=2,
        allow_inf_nan=False,
        description="subtracted per occurrence in the window",
    )
    penalty_last_n: Int = Field(
        64, ge=0, le=4096, description="the penalties' window: the last n characters; 0: off"
    )
    dry_multiplier: Float = Field(
        0.0,
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="DRY: the penalty of a character that extends a repeat (0: off)",
    )
    dry_base: Float = Field(
        1.75, gt=1, le=4, allow_inf_nan=False, description="DRY: the penalty's growth per char"
    )
    dry_allowed_length: Int = Field(
        8, ge=1, le=256, description="DRY: the longest repeat without a penalty"
    )
    dry_sequence_breakers: Annotated[Breakers, BeforeValidator(_json_list_or_object)] = Field(
        default_factory=lambda: ["\n"], description="DRY: a repeat never crosses these"
    )
    dry_penalty_last_n: Int = Field(1024, ge=0, le=4096, description="DRY's window; 0: off")
    banned_strings: Annotated[Banned, BeforeValidator(_json_list_or_object)] = Field(
        default_factory=list, description="texts that never end inside the generated text"
    )
    unknown_chars: Literal["error", "replace", "drop"] | None = Field(
        None,
        description="prime characters outside the vocabulary: refuse them (422), replace "
        "them by look-alikes, or drop them (null: the server's CHARRNN_UNKNOWN_CHARS)",
    )
    min_p: Float = Field(
        0.0,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="keep characters at least this times as likely as the likeliest",
    )
    typical_p: Float = Field(
        1.0, gt=0, le=1, allow_inf_nan=False, description="locally typical sampling's mass"
    )
    max_copy_chars: Int | None = Field(
        None,
        ge=4,
        le=256,
        description="copy guard: no run of more than this many generated characters occurs "
        "in the training text (needs the model's text index; null: off)",
    )
    novel_lines: bool = Field(
        False,
        description="copy guard: no generated line is a line of the training text (needs "
        "the model's text index)",
    )


class GenerateRequest(SamplesAndControls):
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
    temperature: Float = Field(
        1.0, ge=0, le=10, allow_inf_nan=False, description="0: greedy (the same text as top_k 1)"
    )
    top_k: Int | None = Field(None, ge=1, description="sample among the k likeliest")
    top_p: Float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="nucleus mass")
    seed: Int | None = Field(None, ge=0, lt=MAX_SEED, description="null: the server picks")
    stop: StopList = Field(default_factory=list, description="end when the text ends with one")
    model: str | None = Field(None, description="a loaded model; null: the default")
    logprobs: Int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="give each generated character's logprob and this many likeliest "
        "alternatives (null: no logprobs)",
    )
    constraint: Annotated[dict[str, Any] | None, BeforeValidator(_json_text)] = Field(
        None,
        description="hold the generated text to a form: exactly one of regex, choice, "
        "json_schema or grammar (on GET: JSON text); null: free text",
        examples=[{"regex": "[A-Z][a-z]{3,9}(ia|or|wen)"}, {"choice": ["yes", "no"]}],
    )


class ConstraintResult(BaseModel):
    matched: bool = Field(description="whether the generated text is a complete match")


class Usage(BaseModel):
    prime_chars: int
    generated_chars: int


class Timings(BaseModel):
    queue_ms: float
    warmup_ms: float
    generate_ms: float
    chars_per_s: float


class TopLogprob(BaseModel):
    text: str
    logprob: float


class LogprobsOut(BaseModel):
    """One entry per character: its offset in the text, the character, its logprob (null
    for a first character with nothing before it) and its likeliest alternatives."""

    text_offset: list[int]
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[list[TopLogprob] | None]


class InputReport(BaseModel):
    """What ``unknown_chars`` did to the prime: [character, replacement, position] and
    [character, position], positions in the prime as sent."""

    replaced: list[tuple[str, str, int]]
    dropped: list[tuple[str, int]]


class Sample(BaseModel):
    index: int
    generated_text: str
    finish_reason: Literal["length", "stop"]
    seed: int
    score: float | None = Field(
        description="the mean logprob per generated character (null for an empty text)"
    )
    logprobs: LogprobsOut | None = None
    constraint: ConstraintResult | None = None


class GenerateResponse(BaseModel):
    model: str
    checkpoint: str = Field(description="the first 12 hex digits of the checkpoint's sha256")
    prime: str
    generated_text: str
    finish_reason: Literal["length", "stop"]
    seed: int
    usage: Usage
    timings: Timings
    logprobs: LogprobsOut | None = Field(None, description="present when the request asked")
    constraint: ConstraintResult | None = Field(
        None, description="present when the request had a constraint"
    )
    samples: list[Sample] | None = Field(
        None, description="with n > 1: every sample, best first with best_of (else in order)"
    )
    input: InputReport | None = Field(
        None, description="with unknown_chars replace or drop: what was done to the prime"
    )


# -- scoring and the tokenizer ------------------------------------------------------------


class ScoreRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"text": " was beginning", "context": "Alice"}]},
    )

    text: str = Field(min_length=1, description="the text to score, character by character")
    context: str = Field("", description="conditions the score; not scored")
    top_logprobs: Int = Field(
        0, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per character"
    )
    model: str | None = Field(None, description="a loaded model; null: the default")


class ScoreResponse(BaseModel):
    model: str
    chars: int = Field(description="characters in text")
    scored_chars: int = Field(description="characters with a logprob (all but a first one)")
    nll: float | None = Field(description="mean negative logprob, nats per character")
    bpc: float | None = Field(description="the same in bits per character")
    perplexity: float | None
    logprobs: LogprobsOut


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    add_special_tokens: bool = Field(True, description="accepted; a character model has none")
    model: str | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[Int]
    model: str | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class StreamError(BaseModel):
    message: str
    type: str


# -- operations ---------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready", "loading", "shutting_down", "failing"]
    models: dict[str, bool] = Field(default_factory=dict)
    failing: dict[str, str] = Field(
        default_factory=dict, description="models whose decode keeps failing, and why"
    )


class Architecture(BaseModel):
    cell: str
    layers: int
    hidden: int
    embed: int
    vocab_size: int


class TextIndexInfo(BaseModel):
    chars: int = Field(description="characters of the training text")
    lines: int = Field(description="its distinct non-empty lines")
    corpus_sha256: str


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
    decode_failing: str | None = Field(
        None,
        description="why this model's decode keeps failing (it then answers /ready with 503); "
        "null while it works",
    )
    decode_reason: str = Field(description="why the decode step runs in this precision")
    batch_invariant: bool = Field(
        description="whether a request's text is the same alone or among other requests"
    )
    batch_invariance: str = Field(description="why it is or is not")
    text_index: TextIndexInfo | None = Field(
        None,
        description="the training text's index, which the copy guard (max_copy_chars, "
        "novel_lines) reads; null: this model has none and refuses the guard",
    )


class ConstraintLimits(BaseModel):
    """What a generation's ``constraint`` may be (docs/api.md, "Structured generation")."""

    kinds: list[str] = Field(description="the keys a constraint may have, one at a time")
    max_regex_chars: int
    max_choices: int
    max_schema_bytes: int = Field(description="a json_schema's size as JSON")
    max_schema_depth: int = Field(description="how deep a json_schema may nest")
    max_grammar_bytes: int
    compile_s: float = Field(description="longest a constraint may take to compile")


class ControlInfo(BaseModel):
    """One generation control (or sample count): its default and bounds."""

    name: str
    default: Any
    minimum: float | None = Field(None, description="inclusive, unless exclusive_minimum")
    exclusive_minimum: bool = False
    maximum: float | None = Field(None, description="inclusive, unless exclusive_maximum")
    exclusive_maximum: bool = False
    max_items: int | None = Field(None, description="for lists and objects")
    description: str | None = None


class Limits(BaseModel):
    max_n: int = Field(description="samples one request may ask for (n, best_of)")
    controls: list[ControlInfo] = Field(description="the generation controls and their rules")
    max_prime_chars: int
    max_new_chars_limit: int
    max_concurrent: int
    max_queue: int
    max_body_bytes: int
    max_score_chars: int = Field(description="longest text POST /score takes")
    auth_required: bool
    constraint: ConstraintLimits


class Info(BaseModel):
    models: list[ModelInfo]
    limits: Limits


# -- OpenAI-compatible ----------------------------------------------------------------------


class LoadModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    path: str = Field(min_length=1, description="a checkpoint in the server's model folder")


class SwapModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="a checkpoint in the server's model folder")


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(SamplesAndControls):
    """OpenAI's completions request, as far as a character model can honour it. Fields
    OpenAI does not define are ignored (clients send extras); OpenAI fields this server does
    not implement are refused with 400 when set to anything but their default
    (``UNSUPPORTED``)."""

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
                },
                {
                    "model": "alice",
                    "prompt": "Alice was",
                    "echo": True,
                    "logprobs": 5,
                    "max_tokens": 0,
                },
            ]
        },
    )

    model: str | None = None
    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(
        description="a string, a list of strings, token ids, or a list of token-id lists: "
        "one choice per prompt"
    )
    max_tokens: Int | None = Field(
        16, ge=0, description="characters to generate (0 only with echo)"
    )
    temperature: Float | None = Field(1.0, ge=0, le=10, allow_inf_nan=False)
    top_p: Float | None = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: Int | None = Field(None, ge=1, description="extension: sample among the k likeliest")
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=0, lt=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="prepend the prompt to the text (scored with logprobs)")
    logprobs: Int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="logprobs and this many alternatives"
    )
    response_format: Any = Field(
        None,
        description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
        '"json_schema": {"name": ..., "schema": {...}}}: the text is compact JSON for it',
    )
    structured_outputs: Any = Field(
        None,
        description="vLLM's: exactly one of regex, choice, json (a schema) or grammar (Lark)",
    )
    # OpenAI's clients may send null for these: the default.
    logit_bias: Annotated[dict[str, Float] | None, BeforeValidator(_json_list_or_object)] = None  # type: ignore[assignment]
    presence_penalty: Float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False)  # type: ignore[assignment]
    frequency_penalty: Float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False)  # type: ignore[assignment]
    # OpenAI fields this server does not implement: only their defaults are accepted.
    suffix: Any = None


# OpenAI fields that are not implemented, with the values that mean "not used".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {"suffix": (None, "")}


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["length", "stop"] | None
    logprobs: CompletionLogprobs | None = None


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
    checkpoint: str | None = Field(None, description="the checkpoint that served (sha256)")
    input: list[InputReport] | None = Field(
        None, description="with unknown_chars replace or drop: what was done to each prompt"
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "charrnn"
    checkpoint: str = Field(description="the first 12 hex digits of the checkpoint's sha256")


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
