"""Frozen dataclass configs for every component, with a strict JSON round trip and presets."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar, get_args, get_origin

PRESET_PACKAGE = "mmrag.presets"

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config is malformed: unknown key, wrong type, or an invalid value."""


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Validate (and lightly coerce, int -> float, list -> tuple) one field value."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{name}: {value!r} is not one of {get_args(hint)}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arm in get_args(hint):
            try:
                return _check_type(name, value, arm)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} does not match {hint}")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{name}: expected null, got {value!r}")
        return None
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        args = get_args(hint)
        item = args[0] if args else Any
        return tuple(_check_type(f"{name}[]", v, item) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected an object, got {type(value).__name__}")
        return dict(value)
    if isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected an object for {hint.__name__}")
        return hint.from_dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint in (str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: subclasses are frozen dataclasses; `validate` checks values."""

    preset_prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _check_type(
                f"{type(self).__name__}.{f.name}", getattr(self, f.name), hints[f.name]
            )
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Override to check value ranges; raise ConfigError."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(names)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls.__name__}: invalid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Self:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    @classmethod
    def preset(cls, name: str) -> Self:
        """Load a named preset shipped in `mmrag/presets/<prefix>-<name>.json`."""
        fname = f"{cls.preset_prefix}-{name}.json"
        ref = resources.files(PRESET_PACKAGE).joinpath(fname)
        if not ref.is_file():
            raise ConfigError(f"no preset {name!r} for {cls.__name__} (looked for {fname})")
        return cls.from_json(ref.read_text(encoding="utf-8"))

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class IndexConfig(Config):
    """The vector index cached beside a memory's SQLite store."""

    kind: Literal["flat", "hnsw", "ivf"] = "flat"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    ivf_nlist: int | None = None  # None: about 4 * sqrt(N), at least 1
    ivf_nprobe: int = 8
    # Tombstones tolerated (as a fraction of the index) before an index that cannot delete
    # in place (HNSW) is rebuilt from SQLite.
    max_tombstone_fraction: float = 0.2

    def validate(self) -> None:
        if self.hnsw_m < 2 or self.hnsw_ef_search < 1 or self.hnsw_ef_construction < 1:
            raise ConfigError("IndexConfig: HNSW parameters must be positive (m >= 2)")
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise ConfigError("IndexConfig: ivf_nlist must be >= 1")
        if self.ivf_nprobe < 1:
            raise ConfigError("IndexConfig: ivf_nprobe must be >= 1")
        if not 0.0 <= self.max_tombstone_fraction <= 1.0:
            raise ConfigError("IndexConfig: max_tombstone_fraction must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class RetrieverConfig(Config):
    """Search strategy (RA-CM3 section 3.2): relevance cap, redundancy, MMR, query dropout."""

    preset_prefix: ClassVar[str] = "retriever"

    k: int = 5
    # Skip candidates scoring above this with the query (near copies). None: off.
    relevance_cap: float | None = None
    # Skip a candidate whose similarity to an already selected one is above this. None: off.
    redundancy_threshold: float | None = None
    # Maximal marginal relevance trade-off in [0, 1] (1 = pure relevance). None: off.
    mmr_lambda: float | None = None
    # Candidates fetched per requested result before the cap / diversity filters.
    candidate_factor: int = 4
    # Fraction of query text tokens dropped before encoding (training only, RA-CM3: 0.2).
    query_dropout: float = 0.0

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError("RetrieverConfig: k must be >= 1")
        if self.candidate_factor < 1:
            raise ConfigError("RetrieverConfig: candidate_factor must be >= 1")
        if self.mmr_lambda is not None and not 0.0 <= self.mmr_lambda <= 1.0:
            raise ConfigError("RetrieverConfig: mmr_lambda must be in [0, 1]")
        if not 0.0 <= self.query_dropout < 1.0:
            raise ConfigError("RetrieverConfig: query_dropout must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class LiteEncoderConfig(Config):
    """The offline `lite` dual encoder: frozen EfficientNet-Lite0 + MiniLM, trained linear heads."""

    preset_prefix: ClassVar[str] = "lite"

    dim: int = 256  # shared embedding width after the projection heads
    image_size: int = 128  # square input side for the image tower
    image_feature_dim: int = 1280  # EfficientNet-Lite0 pooled features
    text_feature_dim: int = 384  # all-MiniLM-L6-v2 sentence embedding
    text_max_tokens: int = 77  # RA-CM3 / CLIP text limit
    # The class bridge (ConSE, Norouzi et al. 2014; docs/encoders.md): an image is first the
    # mean of its top classes' name embeddings, weighted by the image tower's own ImageNet
    # probabilities; the trained heads add residuals to it. 0 classes: plain linear heads.
    bridge_classes: int = 0
    bridge_top_k: int = 10  # classes averaged per image
    bridge_temperature: float = 1.0  # softmax temperature on the classifier's logits
    residual_rank: int = 0  # rank of the image residual (1280 -> dim); 0: full rank
    # How much of each vector stays the untrained bridge: image = normalise((1 - s) *
    # normalise(bridge + residual) + s * bridge), text likewise with its MiniLM embedding,
    # so a trained residual cannot drown what the frozen towers know (0: residuals alone).
    bridge_share: float = 0.0

    @property
    def bridged(self) -> bool:
        return self.bridge_classes > 0

    def validate(self) -> None:
        if self.dim < 1 or self.image_size < 32 or self.text_max_tokens < 2:
            raise ConfigError("LiteEncoderConfig: dim >= 1, image_size >= 32, text_max_tokens >= 2")
        if self.bridge_classes < 0 or self.residual_rank < 0:
            raise ConfigError("LiteEncoderConfig: bridge_classes, residual_rank >= 0")
        if not 0.0 <= self.bridge_share < 1.0 or (self.bridge_share and not self.bridged):
            raise ConfigError(
                "LiteEncoderConfig: 0 <= bridge_share < 1, and a bridge_share needs the bridge"
            )
        if self.bridged and (
            self.dim != self.text_feature_dim
            or not 1 <= self.bridge_top_k <= self.bridge_classes
            or self.bridge_temperature <= 0
        ):
            raise ConfigError(
                "LiteEncoderConfig: a bridged encoder lives in the text tower's space (dim == "
                "text_feature_dim), with 1 <= bridge_top_k <= bridge_classes and a positive "
                "bridge_temperature"
            )


@dataclasses.dataclass(frozen=True)
class EncoderTrainConfig(Config):
    """Contrastive (LiT-style) training of the `lite` encoder's projection heads."""

    preset_prefix: ClassVar[str] = "train-encoder"

    encoder: LiteEncoderConfig = dataclasses.field(default_factory=LiteEncoderConfig)
    holdout: float = 0.2  # fraction of groups held out for evaluation; 0 trains on everything
    group_key: str = "base"  # metadata key whose values are held out together
    seed: int = 0
    epochs: int = 30  # tuned on a validation split of the training families (docs/encoders.md)
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature_init: float = 0.07
    # Bridged encoders: the class names are embedded in each of these templates (";"
    # between them) and averaged; "{}" is the class name, "{description}" its description.
    bridge_prompts: str = "a photo of a {}."

    def validate(self) -> None:
        if "{" not in self.bridge_prompts:
            raise ConfigError("EncoderTrainConfig: bridge_prompts needs a {} or {description}")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError("EncoderTrainConfig: holdout must be in [0, 1)")
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ConfigError("EncoderTrainConfig: epochs >= 1, batch_size >= 2, lr > 0")
