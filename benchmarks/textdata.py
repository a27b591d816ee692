"""Real English text and rendered text images for the OCR and sentence-embedding suite models.

Text source
    The license texts shipped by the operating system under ``/usr/share/common-licenses`` (GPL,
    Apache, MPL, ...), read in a fixed order; when that folder is missing, the docstrings of a fixed
    list of Python standard-library modules.  The text is split into sentences, filtered to printable
    ASCII (every such character except the space is in the PP-OCR dictionary; the space is its last
    class) and de-duplicated.  :func:`corpus` returns the sentences and a sha256 of the text used, so a
    results file says exactly which text it was measured on.

Splits
    :func:`split_sentences` shuffles the sentences with a fixed seed and cuts them into two disjoint
    pools, ``calib`` (first third) and ``eval`` (the rest).  Every generated sample (a text line, a
    page, a sentence) draws its words from one pool only, so calibration and evaluation text never
    share a sentence.

Rendering (Pillow, DejaVu fonts from ``/usr/share/fonts/truetype/dejavu``)
    A text line is drawn dark on a light background with a random DejaVu face and size, cropped to
    the font's line box (ascent + descent) plus a small margin, the way a detector's crop looks.
    Line texts are word spans of a sentence (original case, upper case or title case) or
    number-bearing strings (dates, amounts, codes, times) built around words of a sentence.
    Preprocessing follows the rapidocr wheel: the picture is handled in BGR order, resized to the
    model height keeping the aspect ratio (width capped at the model width, squeezing wider
    crops), scaled ``(x / 255 - 0.5) / 0.5``, laid out CHW and right-padded with zeros.

Report split (``*_report_samples``)
    Data the tuning split never shows, for numbers that were not used to choose anything: sentences
    from Python standard-library docstrings (:func:`report_sentences`; another source than the
    license texts), other typefaces (:func:`report_fonts`: Liberation and GNU FreeFont when the
    Debian packages ``fonts-liberation2`` / ``fonts-freefont-ttf`` are installed, plus the DejaVu
    faces the tuning split does not use), font sizes 14-63 px, any foreground/background colours
    with enough contrast (light on dark too) and Gaussian pixel noise.  Det report pages are laid out
    as paragraphs (left-aligned blocks of evenly spaced lines, one or two columns) instead of
    scattered lines, with random colours (dark pages too) and noise.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_ORDER = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GPL-2", "Artistic", "GFDL-1.3", "BSD", "CC0-1.0")
STDLIB_MODULES = (
    "this", "json", "argparse", "subprocess", "collections", "functools", "itertools", "pathlib",
    "typing", "dataclasses", "logging", "unittest", "threading", "asyncio", "email", "http.client",
    "urllib.request", "random", "statistics", "decimal", "fractions", "datetime", "calendar",
    "textwrap", "difflib", "shutil", "tempfile", "zipfile", "tarfile", "csv", "sqlite3", "pickle",
)
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_NAMES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansCondensed.ttf",
    "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerifCondensed.ttf", "DejaVuSansMono-Bold.ttf",
)
#: Typefaces of the report split (whichever of them are installed): other families than the
#: tuning split's, from the Debian packages fonts-liberation2 and fonts-freefont-ttf.
REPORT_FONT_DIRS = (Path("/usr/share/fonts/truetype/liberation2"), Path("/usr/share/fonts/truetype/liberation"),
                    Path("/usr/share/fonts/truetype/freefont"))
_PRINTABLE = set(string.ascii_letters + string.digits + string.punctuation + " ")


# --------------------------------------------------------------------------- corpus


def _stdlib_text() -> str:
    import codecs
    import importlib

    parts = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - platform without the module
            continue
        if name == "this":  # the Zen of Python is stored rot13-encoded
            parts.append(codecs.decode(mod.s, "rot13"))
        elif mod.__doc__:
            parts.append(mod.__doc__)
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            doc = getattr(obj, "__doc__", None)
            if attr.startswith("_") or not isinstance(doc, str) or getattr(obj, "__module__", None) != name:
                continue
            parts.append(doc)
    return "\n\n".join(parts)


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[tuple[str, ...], str, str]:
    """``(sentences, source description, sha256 of the raw text)``."""
    files = [LICENSE_DIR / n for n in LICENSE_ORDER if (LICENSE_DIR / n).is_file()]
    if files:
        raw = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        source = f"{LICENSE_DIR} ({', '.join(f.name for f in files)})"
    else:
        raw = _stdlib_text()
        source = "Python standard-library docstrings"
    digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()
    return tuple(sentences_from_text(raw)), source, digest


def sentences_from_text(raw: str) -> list[str]:
    """Sentences of 25..240 printable-ASCII characters, mostly letters, de-duplicated in order."""
    text = re.sub(r"\s+", " ", raw)
    out: list[str] = []
    seen: set[str] = set()
    for s in re.split(r"(?<=[.!?;])\s+", text):
        s = s.strip(" -*=_#")
        if not 25 <= len(s) <= 240 or not set(s) <= _PRINTABLE:
            continue
        letters = sum(c.isalpha() for c in s)
        if letters < 0.7 * len(s) or len(s.split()) < 5 or s in seen:
            continue
        seen.add(s)
        out.append(s)
    return out


@functools.lru_cache(maxsize=1)
def report_sentences() -> tuple[tuple[str, ...], str]:
    """``(sentences, source)`` of the report split: text that is not in :func:`corpus`.

    Python standard-library docstrings when the corpus is the license texts; without the license
    folder the corpus is those docstrings already, and the report split gets the second half of the
    ``eval`` pool (disjoint sentences of the same source, said so in the source description).
    """
    import contextlib
    import io as _io

    sents, source, _ = corpus()
    if source.startswith(str(LICENSE_DIR)):
        with contextlib.redirect_stdout(_io.StringIO()):  # importing ``this`` prints the Zen of Python
            other = sentences_from_text(_stdlib_text())
        taken = set(sents)
        return tuple(s for s in other if s not in taken), "Python standard-library docstrings"
    pool = split_sentences()["eval"]
    return tuple(pool[len(pool) // 2 :]), "second half of the eval sentence pool (no license texts here)"


#: Installed third-party packages whose docstrings give the encoder benchmark's tuning split
#: (another source than the license texts of calibration and the standard library of the report split).
PACKAGE_MODULES = ("numpy", "numpy.linalg", "numpy.random", "numpy.ma", "networkx", "click", "jinja2", "mpmath", "fsspec")


def _package_text() -> str:
    import importlib

    parts = []
    for name in PACKAGE_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - package not installed
            continue
        if mod.__doc__:
            parts.append(mod.__doc__)
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr, None)
            doc = getattr(obj, "__doc__", None)
            if attr.startswith("_") or not isinstance(doc, str):
                continue
            owner = getattr(obj, "__module__", None) or ""
            if owner.split(".")[0] != name.split(".")[0]:
                continue
            parts.append(doc)
    return "\n\n".join(parts)


@functools.lru_cache(maxsize=1)
def encoder_splits(n: int = 600, seed: int = 0) -> dict[str, Any]:
    """Sentence splits of the encoder benchmark, three disjoint sources.

    ``calib``: the ``calib`` pool of :func:`split_sentences` (license texts); ``tune``: ``n``
    sentences of the docstrings of :data:`PACKAGE_MODULES` (installed third-party packages);
    ``report``: ``n`` sentences of :func:`report_sentences` (Python standard-library docstrings).
    Each split is shuffled with ``seed``; no sentence is in two splits. ``sources`` describes them
    and ``sha256`` fingerprints the tune and report sentences.
    """
    import contextlib
    import io as _io

    calib = split_sentences(seed)["calib"]
    report_all, report_source = report_sentences()
    taken = set(calib) | set(corpus()[0]) | set(report_all)
    with contextlib.redirect_stdout(_io.StringIO()):
        tune_all = [s for s in sentences_from_text(_package_text()) if s not in taken]
    rng = np.random.default_rng(seed)
    tune = [tune_all[i] for i in rng.permutation(len(tune_all))[:n]]
    report = [report_all[i] for i in rng.permutation(len(report_all))[:n]]
    digest = {k: hashlib.sha256("\n".join(v).encode()).hexdigest()[:16] for k, v in (("tune", tune), ("report", report))}
    return {"calib": calib, "tune": tune, "report": report, "sha256": digest,
            "sources": {"calib": f"{corpus()[1]}, calib pool", "tune": f"docstrings of {', '.join(PACKAGE_MODULES)}",
                        "report": report_source}}


def split_sentences(seed: int = 0) -> dict[str, list[str]]:
    """Disjoint ``calib`` / ``eval`` sentence pools (see the module docstring)."""
    sents = list(corpus()[0])
    order = np.random.default_rng(seed).permutation(len(sents))
    shuffled = [sents[i] for i in order]
    cut = len(shuffled) // 3
    return {"calib": shuffled[:cut], "eval": shuffled[cut:]}


# --------------------------------------------------------------------------- fonts and lines


@functools.lru_cache(maxsize=512)
def _font(name: str, size: int):
    """A font by file name in :data:`FONT_DIR` or by absolute path."""
    from PIL import ImageFont

    return ImageFont.truetype(str(FONT_DIR / name), size)


@functools.lru_cache(maxsize=1)
def report_fonts() -> tuple[str, ...]:
    """Absolute paths of the report split's typefaces: none of them is in :data:`FONT_NAMES`."""
    found = sorted(str(p) for d in REPORT_FONT_DIRS if d.is_dir() for p in d.glob("*.ttf"))
    unused_dejavu = sorted(str(p) for p in FONT_DIR.glob("DejaVu*.ttf")
                           if p.name not in FONT_NAMES and "Math" not in p.name)
    return tuple(found + unused_dejavu)


def report_fonts_info() -> str:
    fonts = report_fonts()
    families = sorted({Path(f).parent.name for f in fonts})
    return f"{len(fonts)} faces ({', '.join(families)}; DejaVu only faces the tuning split does not use)"


def fonts_available() -> bool:
    return all((FONT_DIR / n).is_file() for n in FONT_NAMES)


def _line_size(text: str, font, margin: tuple[int, int]) -> tuple[int, int]:
    ascent, descent = font.getmetrics()
    return int(math.ceil(font.getlength(text))) + 2 * margin[0], ascent + descent + 2 * margin[1]


def _number_string(rng: np.random.Generator, words: list[str]) -> str:
    word = words[int(rng.integers(len(words)))].strip(string.punctuation) or "Total"
    kind = int(rng.integers(8))
    if kind == 0:
        return f"{int(rng.integers(1990, 2031))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    if kind == 1:
        return f"{word.capitalize()}: ${int(rng.integers(1, 99999)):,}.{int(rng.integers(100)):02d}"
    if kind == 2:
        return f"+{int(rng.integers(1, 99))} {int(rng.integers(100, 999))} {int(rng.integers(1000, 9999))}"
    if kind == 3:
        letters = "".join(rng.choice(list(string.ascii_uppercase), 2))
        return f"{letters}-{int(rng.integers(1000, 99999))}"
    if kind == 4:
        return f"{word} {int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}"
    if kind == 5:
        return f"{float(rng.uniform(0, 100)):.1f}% {word}"
    if kind == 6:
        return f"No. {int(rng.integers(1, 100000))}"
    return f"Section {int(rng.integers(1, 20))}.{int(rng.integers(1, 10))} {word}"


def sample_line_text(
    rng: np.random.Generator, pool: list[str], font, max_aspect: float, margin: tuple[int, int]
) -> str:
    """A line text from ``pool`` whose crop (font line box + margin) has width/height <= max_aspect."""
    words = pool[int(rng.integers(len(pool)))].split()
    style = rng.random()
    if style < 0.2:
        text_words = _number_string(rng, words).split()
    else:
        start = int(rng.integers(len(words)))
        text_words = words[start:] + words[:start] if start else words
    limit = int(rng.integers(2, 9))  # words per line before the width limit
    chosen: list[str] = []
    for w in text_words[: limit if style >= 0.2 else len(text_words)]:
        trial = " ".join(chosen + [w])
        width, height = _line_size(trial, font, margin)
        if width / height > max_aspect:
            break
        chosen.append(w)
    if not chosen:  # a single word too wide: cut it
        w = text_words[0]
        while len(w) > 1:
            width, height = _line_size(w, font, margin)
            if width / height <= max_aspect:
                break
            w = w[:-1]
        chosen = [w]
    text = " ".join(chosen)
    if 0.2 <= style < 0.3:
        text = text.upper()
    elif 0.3 <= style < 0.4:
        text = text.title()
    return text


def _colors(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    bg = int(rng.integers(200, 256))
    fg = int(rng.integers(0, 80))
    tint = rng.integers(-12, 13, size=3)
    bgc = tuple(int(np.clip(bg + t, 0, 255)) for t in tint)
    fgc = tuple(int(np.clip(fg + t, 0, 255)) for t in tint)
    return bgc, fgc


@dataclass
class LineImage:
    text: str
    image: np.ndarray  # HxWx3 uint8, RGB


def _draw_line(rng: np.random.Generator, pool: list[str], max_aspect: float, fonts, sizes: tuple[int, int],
               margins: tuple[int, int], colors) -> tuple[str, np.ndarray]:
    """One line's text and RGB crop: a face of ``fonts`` at a size in ``[sizes)``, margins below
    ``margins`` (x, y), ``colors(rng) -> (bg, fg)``."""
    from PIL import Image, ImageDraw

    font = _font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(*sizes)))
    margin = (int(rng.integers(2, margins[0])), int(rng.integers(2, margins[1])))
    text = sample_line_text(rng, pool, font, max_aspect, margin)
    width, height = _line_size(text, font, margin)
    bg, fg = colors(rng)
    img = Image.new("RGB", (width, height), bg)
    ImageDraw.Draw(img).text(margin, text, font=font, fill=fg)
    return text, np.asarray(img)


def render_line(rng: np.random.Generator, pool: list[str], max_aspect: float) -> LineImage:
    return LineImage(*_draw_line(rng, pool, max_aspect, FONT_NAMES, (28, 41), (10, 7), _colors))


def _contrasting_colors(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Any background and foreground colour whose mean levels differ by at least 90 (of 255)."""
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 256, 3))
    while abs(np.mean(bg) - np.mean(fg)) < 90:
        fg = tuple(int(v) for v in rng.integers(0, 256, 3))
    return bg, fg


def _add_noise(rng: np.random.Generator, image: np.ndarray, max_sigma: float) -> np.ndarray:
    noisy = image.astype(np.float32) + rng.normal(0.0, rng.uniform(0.0, max_sigma), image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def render_report_line(rng: np.random.Generator, pool: list[str], max_aspect: float) -> LineImage:
    """A line of the report split: report typefaces, 14-63 px, any contrasting colours, noise."""
    text, img = _draw_line(rng, pool, max_aspect, report_fonts(), (14, 64), (14, 10), _contrasting_colors)
    return LineImage(text, _add_noise(rng, img, 12.0))


def normalize_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr-style rec/cls preprocessing of an RGB crop into ``[3, height, width]`` float32."""
    from PIL import Image

    h, w = image.shape[:2]
    new_w = min(width, int(math.ceil(height * w / h)))
    resized = np.asarray(Image.fromarray(image).resize((new_w, height), Image.BILINEAR), dtype=np.float32)
    chw = (resized[:, :, ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5  # BGR, as cv2 loads images
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :new_w] = chw
    return out


def normalize_page(image: np.ndarray) -> np.ndarray:
    """rapidocr-style det preprocessing of an RGB page (sides multiple of 32) into ``[3, H, W]``."""
    return ((image[:, :, ::-1].astype(np.float32).transpose(2, 0, 1) / 255.0) - 0.5) / 0.5


# --------------------------------------------------------------------------- data sets


def rec_samples(pool: list[str], n: int, seed: int, height: int = 48, width: int = 320, render=render_line):
    """``(x [n, 3, height, width], texts)`` of rendered lines that fit ``width`` without squeezing.

    ``render`` is :func:`render_line` (tuning) or :func:`render_report_line` (report split)."""
    rng = np.random.default_rng(seed)
    xs, texts = [], []
    for _ in range(n):
        line = render(rng, pool, max_aspect=width / height)
        xs.append(normalize_crop(line.image, height, width))
        texts.append(line.text)
    return np.stack(xs), texts


def cls_samples(pool: list[str], n: int, seed: int, height: int = 48, width: int = 192, render=render_line):
    """``(x [n, 3, height, width], labels)``: every other crop (shuffled) is rotated by 180 degrees."""
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(n)], dtype=np.int64)
    rng.shuffle(labels)
    xs = []
    for lab in labels:
        line = render(rng, pool, max_aspect=1.25 * width / height)
        img = line.image[::-1, ::-1] if lab else line.image
        xs.append(normalize_crop(np.ascontiguousarray(img), height, width))
    return np.stack(xs), labels


def det_samples(pool: list[str], n: int, seed: int, size: int = 480, lines: tuple[int, int] = (5, 10)):
    """``(x [n, 3, size, size], gt_boxes)``: pages with non-overlapping text lines.

    Each ground-truth box is the ink bounding box ``[x0, y0, x1, y1]`` (pixel edges) of one line.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    xs, all_boxes = [], []
    for _ in range(n):
        bg, _ = _colors(rng)
        page = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(page)
        occupied: list[tuple[int, int, int, int]] = []
        boxes = []
        want = int(rng.integers(lines[0], lines[1] + 1))
        tries = 0
        while len(boxes) < want and tries < 60:
            tries += 1
            font = _font(FONT_NAMES[int(rng.integers(len(FONT_NAMES)))], int(rng.integers(16, 37)))
            max_w = size * float(rng.uniform(0.35, 0.9))
            _, lh = _line_size("Ag", font, (0, 0))
            text = sample_line_text(rng, pool, font, max_aspect=max_w / lh, margin=(0, 0))
            tw, th = _line_size(text, font, (0, 0))
            if tw >= size - 16 or th >= size - 16:
                continue
            x = int(rng.integers(8, size - tw - 8))
            y = int(rng.integers(8, size - th - 8))
            gap = max(8, th // 2)
            cand = (x - gap, y - gap, x + tw + gap, y + th + gap)
            if any(cand[0] < o[2] and o[0] < cand[2] and cand[1] < o[3] and o[1] < cand[3] for o in occupied):
                continue
            mask = Image.new("L", (size, size), 0)
            ImageDraw.Draw(mask).text((x, y), text, font=font, fill=255)
            ys, xs_ = np.nonzero(np.asarray(mask))
            if ys.size == 0:
                continue
            _, fg = _colors(rng)
            draw.text((x, y), text, font=font, fill=fg)
            occupied.append((x, y, x + tw, y + th))
            boxes.append([xs_.min(), ys.min(), xs_.max() + 1, ys.max() + 1])
        xs.append(normalize_page(np.asarray(page)))
        all_boxes.append(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    return np.stack(xs), all_boxes


def det_report_samples(pool: list[str], n: int, seed: int, size: int = 480):
    """``(x [n, 3, size, size], gt_boxes)``: report pages laid out as paragraphs.

    Each page holds one or two columns of left-aligned text blocks (a report typeface, 14-30 px,
    line pitch 1.4-2.2 line heights, a blank line or more between blocks), any contrasting colours
    (dark pages too) and pixel noise.  Boxes are ink boxes of each line, as in :func:`det_samples`.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    fonts = report_fonts()
    xs, all_boxes = [], []
    for _ in range(n):
        bg, fg = _contrasting_colors(rng)
        page = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(page)
        mask = Image.new("L", (size, size), 0)
        mdraw = ImageDraw.Draw(mask)
        columns = int(rng.integers(1, 3))
        gutter = 24
        col_w = (size - 2 * 16 - (columns - 1) * gutter) // columns
        boxes = []
        for c in range(columns):
            x0 = 16 + c * (col_w + gutter)
            y = int(rng.integers(10, 40))
            while True:
                font = _font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(14, 31)))
                _, lh = _line_size("Ag", font, (0, 0))
                pitch = int(lh * rng.uniform(1.4, 2.2))
                block = int(rng.integers(2, 7))
                if y + lh > size - 10:
                    break
                for _ in range(block):
                    if y + lh > size - 10:
                        break
                    width = col_w * float(rng.uniform(0.45, 1.0))
                    text = sample_line_text(rng, pool, font, max_aspect=width / lh, margin=(0, 0))
                    mask.paste(0, (0, 0, size, size))
                    mdraw.text((x0, y), text, font=font, fill=255)
                    ys, xs_ = np.nonzero(np.asarray(mask))
                    if ys.size and xs_.max() < size:
                        draw.text((x0, y), text, font=font, fill=fg)
                        boxes.append([xs_.min(), ys.min(), xs_.max() + 1, ys.max() + 1])
                    y += pitch
                y += int(pitch * rng.uniform(1.0, 2.0))
        xs.append(normalize_page(_add_noise(rng, np.asarray(page), 10.0)))
        all_boxes.append(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    return np.stack(xs), all_boxes
