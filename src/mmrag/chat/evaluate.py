"""`mmrag eval chat`: does the chat answer in words, name what it sees, and show what is asked?

On the test families of `chat/prompts.py` (never used to fit anything), four kinds of single
turns and one kind of two-turn conversation, each run through `Chat.chat`, the function
`mmrag chat` and `POST /chat` call, with the shipped options:
- (a) "What is this?" with a stored document's image: right when the reply's words name it
  (a word of the caption's head, before any ':', outside stop words);
- (b) "Show me a picture of X." for X in the memory: right when the first image shown is
  X's document (or one with the same caption);
- (c) plain questions: clean when the reply is words and no image;
- (d) "Draw X." for X of a family left out of the memory: right when exactly one image is
  shown and it was generated;
- (e) "Show me X." then "Now Y.": right when the second reply's first image is Y's document.
The memory holds every document except the (d) families' (built once and cached).
Systems: the shipped chat, the same without retrieval, and (with `--legacy-memory`, a
memory built with the fromage encoder over the same documents) the FROMAGe / GILL token
decoding the chat used before. Reported: share of replies with words, images per reply,
accuracy per kind, decision F1 of "generate" on (b) + (d), seconds per turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmrag.chat.assistant import Chat, load_chat
from mmrag.chat.prompts import PLAIN, Item, family_split, load_items
from mmrag.data.readers import read_sources
from mmrag.documents import Document, load_image
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory, ensure_memory
from mmrag.metrics.report import prepare, report
from mmrag.models.fromage.conversation import ChatOptions, ImagePart, Message, Reply

logger = logging.getLogger(__name__)

STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "and",
        "with",
        "in",
        "on",
        "at",
        "to",
        "for",
        "man",
        "woman",
        "person",
        "people",
        "skin",
        "tone",
        "light",
        "medium",
        "dark",
        "flag",
        "button",
        "sign",
    ]
)
KINDS = ("what", "show", "plain", "draw", "follow")


def absent(family: str) -> bool:
    """Half of the test families (by hash) stay out of the memory: the things to draw."""
    return (
        family_split(family) == "test"
        and int(hashlib.sha256(family.encode()).hexdigest(), 16) % 2 == 0
    )


def head_words(caption: str) -> set[str]:
    words = re.findall(r"[a-z]+", caption.split(":")[0].lower())
    return {w for w in words if w not in STOP and len(w) > 2} or set(words)


def names(text: str, caption: str) -> bool:
    return bool(head_words(caption) & set(re.findall(r"[a-z]+", text.lower())))


@dataclasses.dataclass
class Case:
    kind: str
    turns: list[list[Any]]  # the user turns' parts
    caption: str  # the thing asked about (the last turn's)


def cases(items: Sequence[Item], per_kind: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    test = [i for i in items if family_split(i.family) == "test"]
    present = [i for i in test if not absent(i.family) and i.image is not None]
    missing = [i for i in test if absent(i.family)]
    out: list[Case] = []
    for item in rng.sample(present, min(per_kind, len(present))):
        assert item.image is not None
        out.append(Case("what", [[load_image(item.image), "What is this?"]], item.caption))
    for item in rng.sample(present, min(per_kind, len(present))):
        out.append(Case("show", [[f"Show me a picture of {item.caption}."]], item.caption))
    for question in PLAIN["test"][:per_kind]:
        out.append(Case("plain", [[question]], ""))
    for item in rng.sample(missing, min(per_kind, len(missing))):
        out.append(Case("draw", [[f"Draw {item.caption}."]], item.caption))
    for _ in range(max(1, per_kind // 2)):
        a, b = rng.sample(present, 2)
        out.append(Case("follow", [[f"Show me {a.caption}."], [f"Now {b.caption}."]], b.caption))
    return out


def build_memory(path: Path, data: Sequence[Path], encoder: str = "lite") -> Memory:
    """The evaluation memory: every document but the absent families'."""
    from mmrag.encoders.base import EncoderSpec

    def keep(doc: Document) -> bool:
        family = str(doc.metadata.get("base") or doc.text)
        return not absent(family)

    memory = ensure_memory(path, EncoderSpec(name=encoder))
    sources = (d for d in read_sources(data) if not isinstance(d, Document) or keep(d))
    ingest(memory, sources, progress=False)
    return memory


def _conversation(chat: Chat, case: Case, opts: ChatOptions) -> tuple[list[Reply], float]:
    history: list[Message] = []
    replies = []
    start = time.perf_counter()
    for parts in case.turns:
        history.append(Message("user", parts))
        reply = chat.chat(history, opts)
        replies.append(reply)
        history.append(Message("assistant", [reply.text or " "]))
    return replies, (time.perf_counter() - start) / len(case.turns)


def _right(case: Case, reply: Reply) -> bool:
    images = reply.images
    if case.kind == "what":
        return names(reply.text, case.caption)
    if case.kind in ("show", "follow"):
        first = images[0].document if images else None
        return first is not None and first.text == case.caption
    if case.kind == "plain":
        return bool(reply.text) and not images
    return len(images) == 1 and images[0].source == "generated"  # draw


def score(chat: Chat, all_cases: Sequence[Case], opts: ChatOptions) -> dict[str, Any]:
    per_kind: dict[str, list[bool]] = {k: [] for k in KINDS}
    texts, counts, seconds = [], [], []
    tp = fp = fn = 0
    transcripts = []
    for case in all_cases:
        replies, took = _conversation(chat, case, opts)
        seconds.append(took)
        texts += [bool(r.text) for r in replies]
        counts += [len(r.images) for r in replies]
        last = replies[-1]
        per_kind[case.kind].append(_right(case, last))
        if case.kind in ("show", "draw"):
            generated = bool(last.images) and last.images[0].source == "generated"
            tp += generated and case.kind == "draw"
            fp += generated and case.kind == "show"
            fn += (not generated) and case.kind == "draw"
        transcripts.append(_transcript(case, replies))
    f1 = 2 * tp / max(1, 2 * tp + fp + fn)
    return {
        "text_rate": sum(texts) / max(1, len(texts)),
        "images_per_reply": sum(counts) / max(1, len(counts)),
        "accuracy": {k: sum(v) / len(v) for k, v in per_kind.items() if v},
        "n": {k: len(v) for k, v in per_kind.items()},
        "decision_f1": f1,
        "seconds_per_turn": sum(seconds) / max(1, len(seconds)),
        "transcripts": transcripts,
    }


def _transcript(case: Case, replies: Sequence[Reply]) -> dict[str, Any]:
    turns = []
    for parts, reply in zip(case.turns, replies, strict=True):
        user = " ".join("<image>" if not isinstance(p, str) else p for p in parts)
        shown = [_shown(p) for p in reply.images]
        turns.append({"user": user, "text": reply.text, "images": shown})
    return {"kind": case.kind, "truth": case.caption, "turns": turns}


def _shown(part: ImagePart) -> str:
    if part.document is not None:
        return f"retrieved {part.document.text!r} ({part.document.score:.3f})"
    p = f" p_generate {part.p_generate:.2f}" if part.p_generate is not None else ""
    return f"generated{p}"


def evaluate(
    data: Sequence[Path],
    memory_path: Path,
    per_kind: int = 10,
    seed: int = 0,
    legacy_memory: Path | None = None,
    encoder: str = "lite",
    gill: bool = True,
) -> dict[str, Any]:
    items = load_items(data)
    all_cases = cases(items, per_kind, seed)
    if not (memory_path / "manifest.json").exists():
        logger.info("building the evaluation memory in %s", memory_path)
        build_memory(memory_path, data, encoder).close()
    systems: dict[str, dict[str, Any]] = {}
    with Memory.open(memory_path) as memory:
        chat = load_chat(memory, None if gill else False)
        shipped = ChatOptions()
        runs: dict[str, Callable[[], dict[str, Any]]] = {
            "chat (shipped)": lambda: score(chat, all_cases, shipped),
            "chat, no retrieval": lambda: score(
                chat, all_cases, dataclasses.replace(shipped, retrieval=False)
            ),
        }
        for name, run in runs.items():
            logger.info("scoring %s", name)
            systems[name] = run()
    if legacy_memory is not None:
        with Memory.open(legacy_memory) as memory:
            legacy = load_chat(memory, None if gill else False, decision=False)
            systems["previous chat (FROMAGe/GILL tokens)"] = score(
                legacy, all_cases, ChatOptions(mode="tokens")
            )
    return {
        "benchmark": "chat",
        "data": [str(d) for d in data],
        "memory": str(memory_path),
        "per_kind": per_kind,
        "seed": seed,
        "systems": systems,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| system | replies with words | images / reply | (a) named | (b) right image | "
        "(c) clean | (d) drawn | (e) follow-up | decision F1 | s / turn |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in result["systems"].items():
        a = s["accuracy"]
        cells = [f"{a.get(k, float('nan')):.2f}" for k in KINDS]
        lines.append(
            f"| {name} | {s['text_rate']:.2f} | {s['images_per_reply']:.2f} | "
            + " | ".join(cells)
            + f" | {s['decision_f1']:.2f} | {s['seconds_per_turn']:.2f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmrag eval chat", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        nargs="+",
        type=Path,
        required=True,
        metavar="PATH",
        help="the captioned documents (e.g. .cache/data/emoji .cache/data/photos)",
    )
    p.add_argument(
        "--memory",
        type=Path,
        default=Path(".cache/eval-chat/memory"),
        help="the evaluation memory (built from --data when missing)",
    )
    p.add_argument(
        "--legacy-memory",
        type=Path,
        default=None,
        help="a fromage-encoder memory of the same documents: also score the "
        "previous FROMAGe/GILL token decoding",
    )
    p.add_argument("--encoder", default="lite", help="encoder of a memory built here (lite)")
    p.add_argument("--no-gill", action="store_true", help="FROMAGe only: every image retrieved")
    p.add_argument("--per-kind", type=int, default=10, help="cases of each kind")
    p.add_argument("--seed", type=int, default=0, help="seed of the case draw")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("runs/eval-chat.json"), help="results JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    prepare(args.threads)
    result = evaluate(
        args.data,
        args.memory,
        args.per_kind,
        args.seed,
        args.legacy_memory,
        args.encoder,
        not args.no_gill,
    )
    report(result, args.out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
