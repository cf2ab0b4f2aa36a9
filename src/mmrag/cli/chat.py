"""`mmrag chat MEMORY`: chat with the frozen LM over any memory, grounded in what it retrieves.

One turn (`--message TEXT [--image PATH ...] [--json]`) or an interactive session (no
`--message`): type a message; `/image PATH` attaches an image to the next one; `/quit` ends.
Retrieved images are shown by their stored file, generated ones are written to `--image-dir`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mmrag.chat import Chat, ChatOptions, ImagePart, Message, Reply, load_chat


def build_parser() -> argparse.ArgumentParser:
    d = ChatOptions()
    p = argparse.ArgumentParser(
        prog="mmrag chat",
        description="Chat with SmolLM2-135M-Instruct and FROMAGe/GILL adapters over MEMORY: "
        "interleaved text and images in; out, an answer in words grounded in the documents "
        "the turn retrieves, and images only when you ask for them (retrieved from MEMORY, "
        "or drawn by GILL), each with its evidence and the decisions' probabilities.",
    )
    p.add_argument("memory", help="memory folder (any encoder)")
    p.add_argument("--message", help="one user message (no --message: interactive)")
    p.add_argument(
        "--image",
        nargs="+",
        default=[],
        metavar="PATH",
        help="images attached to --message, before its text",
    )
    p.add_argument(
        "--gill",
        default=None,
        metavar="DIR",
        help="GILL checkpoint (default: the shipped checkpoints/gill when present)",
    )
    p.add_argument("--no-gill", action="store_true", help="FROMAGe only: every image retrieved")
    p.add_argument(
        "--mode",
        choices=["grounded", "tokens"],
        default=d.mode,
        help="grounded: answer from the retrieved evidence, images when asked for; tokens: "
        "FROMAGe/GILL decoding, images where the LM emits [RET]/[IMG0] (needs a memory built "
        f"with --encoder fromage) (default {d.mode})",
    )
    p.add_argument(
        "--no-retrieval",
        action="store_true",
        help="answer from the conversation alone (no evidence from MEMORY)",
    )
    p.add_argument(
        "--images",
        choices=["auto", "always", "never"],
        default=d.images,
        help="auto: the image decision chooses; always: show one; never: words only "
        f"(default {d.images})",
    )
    p.add_argument("-k", type=int, default=d.k, help=f"evidence documents per image ({d.k})")
    p.add_argument("--max-tokens", type=int, default=d.max_new_tokens, help="reply length cap")
    p.add_argument(
        "--ret-bias",
        type=float,
        default=d.ret_bias,
        help="added to the [RET] logit (> 0: retrieve more often)",
    )
    p.add_argument(
        "--img-bias",
        type=float,
        default=d.img_bias,
        help="added to the image decision's logit (tokens mode: to the [IMG0] logit); > 0: "
        "images more often",
    )
    p.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument(
        "--image-dir",
        type=Path,
        default=Path("chat_images"),
        help="where generated images are written (default chat_images/)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"parts": [{"type": "text"|"image", ...}]} (images with evidence)',
    )
    return p


def _options(args: argparse.Namespace) -> ChatOptions:
    return ChatOptions(
        max_new_tokens=args.max_tokens,
        k=args.k,
        images=args.images,
        mode=args.mode,
        retrieval=not args.no_retrieval,
        ret_bias=args.ret_bias,
        img_bias=args.img_bias,
        temperature=args.temperature,
        seed=args.seed,
    )


def _save_generated(reply: Reply, folder: Path, turn: int) -> list[str]:
    paths = []
    for n, part in enumerate(reply.images):
        if part.image is not None:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"turn{turn}-{n}.png"
            part.image.save(path)
            paths.append(str(path))
    return paths


def _show(reply: Reply, saved: list[str]) -> str:
    lines: list[str] = []
    generated = iter(saved)
    for part in reply.parts:
        if isinstance(part, str):
            lines.append(part)
            continue
        lines.append(_describe(part, next(generated) if part.image is not None else None))
    return "\n".join(lines)


def _describe(part: ImagePart, path: str | None) -> str:
    p = f" (p_generate {part.p_generate:.2f})" if part.p_generate is not None else ""
    if part.source == "generated":
        head = f"[generated image{p}: {path}]"
    elif part.document is not None:
        doc = part.document
        head = f"[retrieved image{p}: {doc.text!r} {doc.image} score {doc.score:.3f} id {doc.id}]"
    else:
        head = "[no image found]"
    evidence = ", ".join(f"{e.id[:8]} {e.score:.3f} {e.text[:30]!r}" for e in part.evidence)
    return f"{head}\n  evidence: {evidence}" if evidence else head


def _one_turn(chat: Chat, args: argparse.Namespace) -> int:
    from mmrag.documents import load_image

    parts: list[Any] = [load_image(p) for p in args.image]
    parts.append(args.message)
    reply = chat.chat([Message("user", parts)], _options(args))
    saved = _save_generated(reply, args.image_dir, 0)
    if args.json:
        payload = reply.to_json(image_data=False)
        generated = iter(saved)
        for part, out in zip(reply.parts, payload["parts"], strict=True):
            if isinstance(part, ImagePart) and part.image is not None:
                out["path"] = next(generated)
        sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    else:
        print(_show(reply, saved))
    return 0


def _interactive(chat: Chat, args: argparse.Namespace) -> int:
    from mmrag.documents import load_image

    history: list[Message] = []
    pending: list[Any] = []
    print("mmrag chat: type a message; /image PATH attaches an image; /quit ends.")
    turn = 0
    for line in sys.stdin:
        text = line.strip()
        if text in ("/quit", "/exit"):
            break
        if text.startswith("/image "):
            pending.append(load_image(text.removeprefix("/image ").strip()))
            continue
        if not text:
            continue
        history.append(Message("user", [*pending, text]))
        pending = []
        reply = chat.chat(history, _options(args))
        print(_show(reply, _save_generated(reply, args.image_dir, turn)))
        history.append(Message("assistant", [reply.text or " "]))
        turn += 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from mmrag.memory.memory import Memory

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with Memory.open(args.memory) as memory:
        gill: str | bool | None = False if args.no_gill else args.gill
        chat = load_chat(memory, gill)
        if args.message is not None:
            return _one_turn(chat, args)
        return _interactive(chat, args)


if __name__ == "__main__":
    raise SystemExit(main())
