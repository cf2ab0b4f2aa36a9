"""The `emoji` data set: every fully-qualified emoji sequence rendered with Noto Color Emoji."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from mmrag.data.writer import DatasetSummary, DatasetWriter, require_file

logger = logging.getLogger(__name__)

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_PACKAGE = "fonts-noto-color-emoji"
FONT_SIZE = 109  # the one size the CBDT bitmap font renders at
IMAGE_SIZE = 128
MARGIN = 0.06  # fraction of the square canvas left white on each side
SINGLE_GLYPH_PROBE = "\U0001f600"  # grinning face: one glyph's advance

SKIN_TONES = {
    "\U0001f3fb": "light skin tone",
    "\U0001f3fc": "medium-light skin tone",
    "\U0001f3fd": "medium skin tone",
    "\U0001f3fe": "medium-dark skin tone",
    "\U0001f3ff": "dark skin tone",
}
VS16 = "\ufe0f"
ZWJ = "\u200d"
GENDER_SIGNS = ("\u2640", "\u2642")
MAN, WOMAN, PERSON = "\U0001f468", "\U0001f469", "\U0001f9d1"
# Multi-person ZWJ sequences (kiss: woman, man; family: man, girl; men holding hands) look
# like their single-codepoint group emoji, so they share its base: keyed by the non-person
# elements of the sequence, in order.
_PEOPLE_CHARS = {MAN, WOMAN, PERSON, "\U0001f466", "\U0001f467", "\U0001f9d2"}
PEOPLE_HOLDING_HANDS = "\U0001f9d1\u200d\U0001f91d\u200d\U0001f9d1"
_GROUP_BASES = {
    ("\U0001f91d",): PEOPLE_HOLDING_HANDS,
    ("\u2764",): "\U0001f491",  # couple with heart
    ("\u2764", "\U0001f48b"): "\U0001f48f",  # kiss
    ("\U0001faef",): "\U0001f93c",  # people wrestling
    (): "\U0001f46a",  # family
}
_GROUP_SINGLES = {c: PEOPLE_HOLDING_HANDS for c in ("\U0001f46b", "\U0001f46c", "\U0001f46d")}

# The emoji package writes CLDR names with ": " and ", " collapsed to "_"; these put them back.
_TONE_RE = re.compile(r"(?:medium-light|medium-dark|light|medium|dark)_skin_tone")
_PEOPLE = {"man", "woman", "person", "adult", "child", "boy", "girl"}
_LISTED = ("couple_with_heart", "kiss", "family")  # CLDR: "kiss: woman, man, light skin tone"
_HAIR = ("bald", "beard", "blond_hair", "curly_hair", "red_hair", "white_hair")
_HAIRED = ("man", "woman", "person")  # CLDR: "woman: medium skin tone, red hair"


@dataclass(frozen=True)
class EmojiName:
    """A CLDR-style name split into its head and qualifiers, skin tones kept apart."""

    head: str
    qualifiers: tuple[str, ...] = ()
    tones: tuple[str, ...] = ()
    trailing: tuple[str, ...] = ()  # qualifiers CLDR lists after the tones (hair styles)

    @property
    def caption(self) -> str:
        rest = (*self.qualifiers, *self.tones, *self.trailing)
        return f"{self.head}: {', '.join(rest)}" if rest else self.head

    @property
    def untoned(self) -> str:
        rest = (*self.qualifiers, *self.trailing)
        return f"{self.head}: {', '.join(rest)}" if rest else self.head

    @property
    def skin_tone(self) -> str | None:
        return ", ".join(self.tones) or None


def _words(snake: str) -> str:
    return snake.replace("_", " ").strip()


def is_flag(sequence: str) -> bool:
    """A country flag (two regional indicators) or a subdivision flag (black flag + tags)."""
    cps = [ord(c) for c in sequence]
    if len(cps) == 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in cps):
        return True
    return len(cps) > 2 and cps[0] == 0x1F3F4 and all(0xE0020 <= c <= 0xE007F for c in cps[1:])


def parse_name(sequence: str, package_name: str) -> EmojiName:
    """Readable CLDR-style name from the emoji package's `:snake_name:`.

    `:woman_dancing_medium_skin_tone:` -> `woman dancing: medium skin tone`;
    `:Japan:` (a flag) -> `flag: Japan`; `:kiss_woman_man:` -> `kiss: woman, man`.
    """
    name = package_name.strip(":")
    if is_flag(sequence):
        return EmojiName(head="flag", qualifiers=(_words(name),))
    if name.startswith("keycap_"):
        return EmojiName(head="keycap", qualifiers=(name.removeprefix("keycap_"),))
    tones = tuple(_words(m) for m in _TONE_RE.findall(name))
    first = _TONE_RE.search(name)
    before = name[: first.start()].rstrip("_") if first else name
    after = _TONE_RE.sub("", name[first.end() :]).strip("_") if first else ""
    trailing = (_words(after),) if after else ()
    for listed in _LISTED:
        if before == listed or before.startswith(listed + "_"):
            people = before.removeprefix(listed).strip("_").split("_") if before != listed else []
            if all(p in _PEOPLE for p in people):
                return EmojiName(_words(listed), tuple(people), tones, trailing)
    for who in _HAIRED:
        for hair in _HAIR:
            if before == f"{who}_{hair}":  # no tone: "man: red hair"
                return EmojiName(who, (_words(hair),), tones, trailing)
            if before == who and after == hair:  # toned: "man: light skin tone, red hair"
                return EmojiName(who, (), tones, trailing)
    return EmojiName(_words(before), (), tones, trailing)


def emoji_base(sequence: str) -> str:
    """The family key shared by every skin tone and gender of one emoji.

    Drops skin-tone modifiers, VS16 and ZWJ + gender sign; a leading MAN or WOMAN (alone or
    starting a ZWJ sequence) becomes PERSON. 💃🏽 -> 💃, 👨🏿‍💻 -> 🧑‍💻, 🏃‍♀️‍➡️ -> 🏃‍➡️.
    Sequences of several people join their group emoji: 👩🏻‍❤️‍💋‍👨🏿 -> 💏, 👬🏽 -> 🧑‍🤝‍🧑.
    """
    s = "".join(c for c in sequence if c not in SKIN_TONES and c != VS16)
    for sign in GENDER_SIGNS:
        s = s.replace(ZWJ + sign, "")
    if s in _GROUP_SINGLES:
        return _GROUP_SINGLES[s]
    elements = s.split(ZWJ)
    others = tuple(e for e in elements if e not in _PEOPLE_CHARS)
    if len(elements) - len(others) >= 2 and others in _GROUP_BASES:
        return _GROUP_BASES[others]
    if s in (MAN, WOMAN) or (s[:1] in (MAN, WOMAN) and s[1:2] == ZWJ):
        s = PERSON + s[1:]
    return s


def file_stem(sequence: str) -> str:
    """Codepoints in lower-case hex joined by '-': 💃🏽 -> '1f483-1f3fd'."""
    return "-".join(f"{ord(c):x}" for c in sequence)


@cache
def _package_data() -> dict[str, dict[str, Any]]:
    import emoji

    return dict(emoji.EMOJI_DATA)


def fully_qualified() -> list[str]:
    """Every fully-qualified sequence in the emoji package, sorted by codepoints."""
    import emoji

    status = emoji.STATUS["fully_qualified"]
    return sorted(k for k, v in _package_data().items() if v["status"] == status)


@cache
def _by_stripped() -> dict[str, str]:
    """VS16-free form -> fully-qualified sequence, to name a base that lost its VS16."""
    return {s.replace(VS16, ""): s for s in fully_qualified()}


def describe_emoji(sequence: str) -> dict[str, Any]:
    """The metadata of one sequence: emoji, name, base, base_name, skin_tone, dataset."""
    name = parse_name(sequence, _package_data()[sequence]["en"])
    base = emoji_base(sequence)
    base_seq = _by_stripped().get(base)
    if base_seq is not None:
        base_name = parse_name(base_seq, _package_data()[base_seq]["en"]).caption
    else:
        base_name = name.untoned
    return {
        "emoji": sequence,
        "name": name.caption,
        "base": base,
        "base_name": base_name,
        "skin_tone": name.skin_tone,
        "dataset": "emoji",
    }


# --- rendering -------------------------------------------------------------------------------


@cache
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(require_file(FONT_PATH, FONT_PACKAGE)), FONT_SIZE)


def is_single_glyph(sequence: str, font: ImageFont.FreeTypeFont | None = None) -> bool:
    """True when the font (Noto's by default) shapes the whole sequence into one glyph.

    A sequence newer than the font falls apart into its components (two people and a
    rabbit for "men with bunny ears: light skin tone, dark skin tone"): not its image.
    """
    font = font or _font()
    return font.getlength(sequence) <= 1.5 * font.getlength(SINGLE_GLYPH_PROBE)


def render(sequence: str, size: int = IMAGE_SIZE) -> Image.Image | None:
    """Render one sequence to a `size`x`size` RGB image on white; None if nothing is drawn."""
    return render_glyph(sequence, _font(), size)


def render_glyph(
    sequence: str, font: ImageFont.FreeTypeFont, size: int = IMAGE_SIZE
) -> Image.Image | None:
    """Draw `sequence` with a colour font and centre it on a white square (`MARGIN` each side)."""
    left, top, right, bottom = (int(v) for v in font.getbbox(sequence))
    canvas = Image.new("RGBA", (right - left + 8, bottom - top + 8), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((4 - left, 4 - top), sequence, font=font, embedded_color=True)
    return on_white_square(canvas, size)


def on_white_square(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image | None:
    """Crop an RGBA drawing to its opaque pixels and centre it on a white `size` square with
    `MARGIN` left on each side (the layout every emoji style shares); None if all transparent."""
    rgba = image.convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = rgba.crop(box)
    side = round(max(glyph.size) / (1 - 2 * MARGIN))
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def build_emoji(out: str | Path, limit: int | None = None, progress: bool = True) -> DatasetSummary:
    """Render every fully-qualified emoji into `out`.

    Skips sequences the font draws empty and sequences it has no single glyph for.
    """
    _font()  # fail early, naming the Debian package, if the font is missing
    writer = DatasetWriter(out, "emoji")
    empty: list[str] = []
    split: list[str] = []
    start = time.perf_counter()
    for seq in tqdm(fully_qualified(), desc="emoji", unit="img", disable=not progress):
        if limit is not None and len(writer) >= limit:
            break
        if not is_single_glyph(seq):
            split.append(seq)
            continue
        image = render(seq)
        if image is None:
            empty.append(seq)
            continue
        meta = describe_emoji(seq)
        writer.add(image, file_stem(seq), str(meta["name"]), meta)
    summary = writer.close()
    logger.info(
        "emoji: rendered %d in %.1f s; skipped %d that render empty and %d the font has no "
        "single glyph for (newer than the font)",
        summary.count,
        time.perf_counter() - start,
        len(empty),
        len(split),
    )
    return summary
