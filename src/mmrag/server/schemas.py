"""The HTTP API's request and response models (pydantic), i.e. the OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictInt,
    StringConstraints,
)
from pydantic.json_schema import SkipJsonSchema

from mmrag.memory.store import KEY_PATTERN
from mmrag.server.config import HARD_MAX_BATCH, HARD_MAX_K, HARD_MAX_TEXT_CHARS

DOC_ID_PATTERN = r"^[0-9a-f]{32}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MAX_FILTER_KEYS = 16
MAX_FILTER_VALUES = 100
MAX_EXCLUDE_IDS = 100
MAX_PARTS = 64
MAX_CHAT_MESSAGES = 32
MAX_SEED = 2**31 - 1

DocId = Annotated[str, StringConstraints(pattern=DOC_ID_PATTERN)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
FilterKey = Annotated[str, StringConstraints(pattern=KEY_PATTERN.pattern)]
FilterScalar = (
    Annotated[str, StringConstraints(max_length=1000)] | StrictInt | StrictBool | float | None
)
FilterValue = (
    FilterScalar | Annotated[list[FilterScalar], Field(min_length=1, max_length=MAX_FILTER_VALUES)]
)
Filters = Annotated[
    dict[FilterKey, FilterValue],
    Field(
        max_length=MAX_FILTER_KEYS,
        description="Metadata filters: a scalar means equality, a list any of its values; "
        "the key `modality` matches the document's kind (text, image, mixed).",
    ),
]
Text = Annotated[str, StringConstraints(max_length=HARD_MAX_TEXT_CHARS)]


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return text


# Documented as a pattern, checked with a clearer message than a pattern mismatch.
NonBlank = Annotated[
    str,
    StringConstraints(max_length=HARD_MAX_TEXT_CHARS),
    AfterValidator(_not_blank),
    Field(json_schema_extra={"pattern": r"\S"}),
]
Base64Image = Annotated[
    str,
    Field(
        description="Encoded image bytes (PNG, JPEG, GIF, WebP, BMP, TIFF) in standard base64",
        json_schema_extra={"contentEncoding": "base64"},
    ),
]
K = Annotated[int, Field(ge=1, le=HARD_MAX_K, description="number of results")]
Seed = Annotated[int | None, Field(ge=0, le=MAX_SEED, description="sampling seed")]


class Request(BaseModel):
    """Request bodies: unknown keys are an error, floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --- search -------------------------------------------------------------------------------


def _needs_one_of(*fields: str) -> ConfigDict:
    return ConfigDict(json_schema_extra={"anyOf": [{"required": [f]} for f in fields]})


class SearchRequest(Request):
    """A text, an image, or both (a mixed query, encoded like a document)."""

    model_config = _needs_one_of("text", "image_base64")

    text: NonBlank | SkipJsonSchema[None] = None
    image_base64: Base64Image | SkipJsonSchema[None] = None
    k: K = 5
    filters: Filters = Field(default_factory=dict)
    exclude_ids: list[DocId] = Field(default_factory=list, max_length=MAX_EXCLUDE_IDS)
    mmr_lambda: float | None = Field(
        None, ge=0.0, le=1.0, description="maximal marginal relevance weight (1 = relevance)"
    )
    relevance_cap: float | None = Field(
        None, ge=-1.0, le=1.0, description="skip near copies of the query scoring above this"
    )
    redundancy_threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="skip results this similar to one already chosen"
    )


class ImageRef(BaseModel):
    """A stored image, served by its SHA-256 (never by a file path)."""

    sha256: str
    url: str
    thumbnail_url: str


class Hit(BaseModel):
    """One retrieved document: the evidence behind a result or a generation."""

    id: str
    score: float
    text: str
    modality: str
    images: list[ImageRef]
    metadata: dict[str, JsonValue]


class SearchResponse(BaseModel):
    results: list[Hit]
    count: int = Field(description="documents in the memory when searched")
    took_ms: float


# --- documents ----------------------------------------------------------------------------


class PartIn(Request):
    """Exactly one of `text` or `image_base64`."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["image_base64"]}]}
    )

    text: NonBlank | SkipJsonSchema[None] = None
    image_base64: Base64Image | SkipJsonSchema[None] = None


class DocumentIn(Request):
    """Either `parts` (interleaved, in order) or `image_base64` and/or `text`."""

    model_config = _needs_one_of("parts", "text", "image_base64")

    parts: (
        Annotated[list[PartIn], Field(min_length=1, max_length=MAX_PARTS)] | SkipJsonSchema[None]
    ) = None
    text: NonBlank | SkipJsonSchema[None] = None
    image_base64: Base64Image | SkipJsonSchema[None] = None
    metadata: dict[str, JsonValue] = Field(default_factory=dict)


class DocumentsRequest(Request):
    documents: list[DocumentIn] = Field(min_length=1, max_length=HARD_MAX_BATCH)


class DocumentsForm(Request):
    """The text fields of a multipart POST /documents (its `image` files come beside)."""

    text: list[NonBlank] = Field(default_factory=list, max_length=HARD_MAX_BATCH)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)


class DocumentStatus(BaseModel):
    id: str
    status: Literal["added", "existing"]


class DocumentsResponse(BaseModel):
    documents: list[DocumentStatus] = Field(description="one per document given, in order")
    added: int
    existing: int
    count: int = Field(description="documents in the memory after this write")


class DeleteResponse(BaseModel):
    id: str
    deleted: Literal[True] = True
    count: int


class PartOut(BaseModel):
    text: str | None = None
    image: ImageRef | None = None


class DocumentOut(BaseModel):
    id: str
    modality: str
    parts: list[PartOut]
    metadata: dict[str, JsonValue]


# --- service ------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


class Limits(BaseModel):
    max_upload_bytes: int
    max_request_bytes: int
    max_pixels: int
    max_k: int
    max_batch_documents: int
    max_text_chars: int


class ServerInfo(BaseModel):
    writable: bool
    open_reads: bool
    limits: Limits
    capabilities: dict[str, bool] = Field(
        description="which generation endpoints are wired (the others answer 501)"
    )


class EncoderInfo(BaseModel):
    name: str
    fingerprint: str
    dim: int


class IndexInfo(BaseModel):
    kind: str
    vectors: int
    generation: int


class StatsResponse(BaseModel):
    count: int
    by_modality: dict[str, int]
    images: int
    deleted_total: int
    generation: int
    encoder: EncoderInfo
    index: IndexInfo
    blob_bytes: int
    database_bytes: int
    server: ServerInfo


# --- generation ---------------------------------------------------------------------------


class GenerationRequest(Request):
    k: Annotated[int, Field(ge=0, le=HARD_MAX_K, description="documents retrieved as evidence")] = 2
    filters: Filters = Field(default_factory=dict)
    seed: Seed = None


class ImageGenerationRequest(GenerationRequest):
    """Caption → image (RA-CM3): retrieve evidence for the prompt, then generate."""

    prompt: Annotated[str, StringConstraints(min_length=1, max_length=HARD_MAX_TEXT_CHARS)]


class CaptionRequest(GenerationRequest):
    """Image → caption (RA-CM3). JSON with `image_base64`, or multipart with an `image` file."""

    image_base64: Base64Image | None = None
    max_tokens: Annotated[int, Field(ge=1, le=512)] = 48


class PngImage(BaseModel):
    media_type: Literal["image/png"] = "image/png"
    width: int
    height: int
    data_base64: str


class ImageGenerationResponse(BaseModel):
    image: PngImage
    evidence: list[Hit]


class CaptionResponse(BaseModel):
    caption: str
    evidence: list[Hit]


class ChatPartIn(Request):
    """Exactly one of `text` or `image_base64`."""

    text: Annotated[str, StringConstraints(min_length=1, max_length=HARD_MAX_TEXT_CHARS)] | None = (
        None
    )
    image_base64: Base64Image | None = None


class ChatMessageIn(Request):
    role: Literal["user", "assistant"]
    parts: list[ChatPartIn] = Field(min_length=1, max_length=16)


class ChatRequest(GenerationRequest):
    """A conversation (FROMAGe / GILL): text and images interleaved, the last turn the user's."""

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES)
    max_tokens: Annotated[int, Field(ge=1, le=512)] = 64


class ChatPartOut(BaseModel):
    """Text; an image retrieved from the memory (`image`, `document_id`); or one generated.
    `source` says which, and `p_generate` is the retrieve-or-generate decision's probability
    (GILL; absent for FROMAGe's [RET], which always retrieves)."""

    type: Literal["text", "image"]
    text: str | None = None
    image: ImageRef | None = None
    document_id: str | None = None
    generated: PngImage | None = None
    source: Literal["retrieved", "generated"] | None = None
    p_generate: float | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    parts: list[ChatPartOut]


class ChatResponse(BaseModel):
    message: ChatMessageOut
    evidence: list[Hit]


# --- errors -------------------------------------------------------------------------------


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: a one-line message, and for invalid input each problem."""

    detail: str
    errors: list[ErrorItem] = Field(default_factory=list)
