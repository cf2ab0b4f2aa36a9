"""The conversations the chat is trained and evaluated on, built from captioned documents.

Families (a document's `base` metadata, else its caption) are split by a hash of their name:
20% test, 10% validation, the rest train, so every variant of a test family is unseen and
the split is the same in every run. Request phrasings are split too: the decision is fitted
on one set of templates and validated on another, so it cannot learn a template by heart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from mmrag.data.writer import documents_files
from mmrag.documents import load_image
from mmrag.models.fromage.conversation import Message

Split = Literal["train", "validation", "test"]

# Asking to be shown something (label 1); "{}" is a caption.
REQUESTS: dict[str, tuple[str, ...]] = {
    "train": (
        "Show me {}.",
        "Can you show me a picture of {}?",
        "I would like to see {}.",
        "Find an image of {}.",
        "Draw {}.",
        "Show me a picture of {}.",
        "Please draw {}.",
        "Give me an image of {}.",
        "Let me see {}.",
        "Generate a picture of {}.",
        "Show me two pictures of {}.",
        "Could you find me a photo of {}?",
    ),
    "validation": (
        "What does {} look like?",
        "Can I see {}?",
        "Make an image of {}.",
        "I want a picture of {}.",
    ),
    "test": (
        "Show me a picture of {}.",
        "Draw {}.",
        "Paint {}.",
        "Display an image of {}.",
    ),
}
# Asking something in words about a named thing (label 0).
QUESTIONS: dict[str, tuple[str, ...]] = {
    "train": (
        "What is {}?",
        "Tell me about {}.",
        "Describe {} in one sentence.",
        "Is {} common?",
        "Why do people like {}?",
        "Where would I find {}?",
        "How do you spell {}?",
        "What color is {}?",
    ),
    "validation": ("Explain {} to a child.", "Who uses {}?"),
    "test": ("Do you know {}?", "Write a sentence about {}."),
}
# Plain questions that name nothing in the memory (label 0).
PLAIN: dict[str, tuple[str, ...]] = {
    "train": (
        "Say hello.",
        "What is 2 plus 2?",
        "What is the capital of France?",
        "Tell me a joke.",
        "How are you today?",
        "Thank you!",
        "Who wrote Hamlet?",
        "Write a haiku about the sea.",
        "What day comes after Monday?",
        "Translate 'cat' into French.",
        "How many legs does a spider have?",
        "Give me a tip for sleeping better.",
    ),
    "validation": (
        "Good morning!",
        "What is 10 minus 3?",
        "Name a planet.",
        "What is your name?",
    ),
    "test": (
        "Say hello.",
        "What is 2 plus 2?",
        "What is the capital of Italy?",
        "How do I boil an egg?",
        "Can you recommend a book?",
        "What is the opposite of hot?",
        "Hi there!",
        "What is the largest ocean?",
        "How are you?",
        "Tell me something interesting.",
    ),
}
# A question about an attached image (label 0: answer in words).
IMAGE_QUESTIONS: dict[str, tuple[str, ...]] = {
    "train": ("What is this?", "What's in this picture?", "Describe this image."),
    "validation": ("Can you tell me what this is?", "What do you see?"),
    "test": ("What is this?",),
}
# A follow-up after an image was shown: "Now a dog." asks for another image (label 1).
FOLLOW_UPS: dict[str, tuple[str, ...]] = {
    "train": ("Now {}.", "And {}?", "Now show me {}."),
    "validation": ("What about {}?",),
    "test": ("Now {}.",),
}


@dataclasses.dataclass(frozen=True)
class Item:
    """A captioned document of the training data."""

    caption: str
    family: str
    image: Path | None


def family_split(family: str) -> Split:
    """20% test, 10% validation, 70% train, by a hash of the family's name."""
    bucket = int(hashlib.sha256(family.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "test" if bucket < 2 else "validation" if bucket == 2 else "train"


def load_items(paths: Sequence[str | Path]) -> list[Item]:
    """Every document with a caption (and its first image, if any), in file order."""
    items = []
    for file in documents_files(paths):
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            parts = record.get("parts") or [{"text": record.get("text")}]
            texts = [p["text"] for p in parts if isinstance(p, dict) and p.get("text")]
            images = [p["image"] for p in parts if isinstance(p, dict) and p.get("image")]
            if not texts:
                continue
            caption = str(texts[0]).strip()
            family = str((record.get("metadata") or {}).get("base") or caption)
            image = (file.parent / images[0]) if images else None
            items.append(Item(caption, family, image))
    return items


@dataclasses.dataclass
class Example:
    """A conversation and whether its last user turn asks to see an image."""

    messages: list[Message]
    label: int
    kind: str


def shown(caption: str) -> str:
    """The assistant's words when it showed an image (a follow-up's history)."""
    return f"Here is a picture of {caption}."


def request_examples(items: Sequence[Item], split: Split, n: int, seed: int) -> list[Example]:
    """`n` conversations of every kind, balanced between asking for an image and not."""
    rng = random.Random(seed)
    pool = [i for i in items if family_split(i.family) == split]
    with_image = [i for i in pool if i.image is not None]
    out: list[Example] = []

    def caption() -> str:
        return rng.choice(pool).caption

    for _ in range(n):
        kind = rng.choice(["request", "question", "plain", "image", "follow", "follow-question"])
        if kind == "request":
            text = rng.choice(REQUESTS[split]).format(caption())
            out.append(Example([Message("user", [text])], 1, kind))
        elif kind == "question":
            text = rng.choice(QUESTIONS[split]).format(caption())
            out.append(Example([Message("user", [text])], 0, kind))
        elif kind == "plain":
            out.append(Example([Message("user", [rng.choice(PLAIN[split])])], 0, kind))
        elif kind == "image" and with_image:
            item = rng.choice(with_image)
            assert item.image is not None
            parts: list = [load_image(item.image), rng.choice(IMAGE_QUESTIONS[split])]
            out.append(Example([Message("user", parts)], 0, kind))
        elif kind == "follow":
            first, second = caption(), caption()
            history = [
                Message("user", [rng.choice(REQUESTS[split]).format(first)]),
                Message("assistant", [shown(first)]),
                Message("user", [rng.choice(FOLLOW_UPS[split]).format(second)]),
            ]
            out.append(Example(history, 1, kind))
        else:
            first = caption()
            history = [
                Message("user", [rng.choice(QUESTIONS[split]).format(first)]),
                Message("assistant", [f"{first.capitalize()} is something people know well."]),
                Message("user", [rng.choice(PLAIN[split])]),
            ]
            out.append(Example(history, 0, "follow-question"))
    return out


def batches(examples: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for start in range(0, len(examples), size):
        yield examples[start : start + size]
