"""A synthetic visual-question dataset drawn on the fly: shapes, colours, counts, positions.

Small enough for a tiny VLM to learn on a CPU in minutes (images of 32-64 px, one tile), with
one-word or one-digit answers from a closed vocabulary (`ANSWERS`). Four tasks, in turn by index:

  shape     "What shape is this?"         one large shape             -> circle | square | triangle
  color     "What color is the shape?"    one large shape             -> red | green | blue | yellow
  count     "How many shapes are there?"  1..max_count shapes         -> 1 | 2 | 3 ...
  position  "Where is the shape?"         one shape in the middle of  -> left | right | top | bottom
                                          the left / right column or the top / bottom row

For count and position the canvas is a 3 x 3 grid of cells, each shape inside its own cell
(radius and jitter keep it there), so shapes never overlap and positions are unambiguous; for
shape and colour one shape spans about a third of the canvas. Shapes are drawn 4x
larger and box-filtered down (antialiased), on black: with nanoVLM's un-normalised [0, 1]
pixels the background patches are zeros and the shapes carry all the signal.

Determinism and splits: sample i of a dataset is a pure function of (seed, i, image_size,
tasks, max_count). A scene's *key* - the task and its integer shape parameters, which
determine both the picture and the question - is hashed, and the hash alone assigns the key
to "train" or "heldout" (`heldout_fraction`). Each split draws candidates (from
`default_rng([seed, i, attempt])`) until one belongs to it, so no (image, question) instance
can appear in both splits, whatever the seeds.

Imports neither jax nor torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .encoding import SampleEncoder

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (240, 210, 20)}
POSITIONS = {"left": (1, 0), "right": (1, 2), "top": (0, 1), "bottom": (2, 1)}  # (row, col) of the 3x3 cells
TASKS = ("shape", "color", "count", "position")
QUESTIONS = {
    "shape": "What shape is this?",
    "color": "What color is the shape?",
    "count": "How many shapes are there?",
    "position": "Where is the shape?",
}
BACKGROUND = (0, 0, 0)  # black: background patches are zeros, so the shapes carry the signal
SUPERSAMPLE = 4
SPLITS = ("train", "heldout")


@dataclass(frozen=True, order=True)
class Shape:
    """One shape in supersampled pixel units (canvas side = image_size * SUPERSAMPLE); `r` is the
    drawn half-extent (circle radius, half the square's side, half the triangle's base and height),
    so that two different shapes never draw the same picture."""

    cx: int
    cy: int
    r: int
    kind: str
    color: str


@dataclass(frozen=True)
class Scene:
    task: str
    shapes: tuple[Shape, ...]  # sorted: the canonical form
    answer: str

    @property
    def question(self) -> str:
        return QUESTIONS[self.task]

    @property
    def key(self) -> tuple:
        return (self.task, self.shapes)


def answers(max_count: int = 3) -> tuple[str, ...]:
    """The closed answer vocabulary."""
    return SHAPES + tuple(COLORS) + tuple(str(k) for k in range(1, max_count + 1)) + tuple(POSITIONS)


ANSWERS = answers()


def split_of(scene: Scene, heldout_fraction: float) -> str:
    digest = hashlib.sha256(repr(scene.key).encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2.0**64 < heldout_fraction else "train"


def render(scene: Scene, image_size: int) -> Image.Image:
    """The RGB picture of `scene`, image_size x image_size."""
    big = image_size * SUPERSAMPLE
    im = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for s in scene.shapes:
        fill = COLORS[s.color]
        box = (s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r)
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.cx, s.cy - s.r), (s.cx - s.r, s.cy + s.r), (s.cx + s.r, s.cy + s.r)], fill=fill)
    return im.resize((image_size, image_size), Image.Resampling.BOX)


class SyntheticShapesDataset:
    """`ds[i]` -> an encoded sample (see `SampleEncoder.encode`); `ds.scene(i)`, `ds.image(i)`,
    `ds.question(i)`, `ds.answer(i)` give the raw parts and `ds.prompt(i)` a generation prompt.

    Args:
      encoder: the `SampleEncoder` (its processor's `img_size` is the default image size).
      split: "train" or "heldout".
      size: number of samples (indices 0..size-1).
      seed: changes which scenes are drawn, not which split a scene belongs to.
      image_size: side of the drawn picture (default: the tile side; that is one tile per image
        when the processor does not upscale, e.g. with `VLMConfig.tiny(max_img_size=32)`).
      tasks: a subset of TASKS; sample i has task tasks[i % len(tasks)].
      max_count: most shapes in a count scene (at most 9).
      heldout_fraction: share of all possible scenes that belongs to "heldout".
    """

    def __init__(
        self,
        encoder: SampleEncoder,
        *,
        split: str = "train",
        size: int = 10_000,
        seed: int = 0,
        image_size: int | None = None,
        tasks: tuple[str, ...] = TASKS,
        max_count: int = 3,
        heldout_fraction: float = 0.1,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        bad = [t for t in tasks if t not in TASKS]
        if not tasks or bad:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks!r}")
        if not 1 <= max_count <= 9:
            raise ValueError(f"max_count must be in 1..9, got {max_count}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.encoder = encoder
        self.split = split
        self.size = size
        self.seed = seed
        self.image_size = int(image_size or encoder.image_size)
        if self.image_size < 12:
            raise ValueError(f"image_size {self.image_size} is too small to draw on (at least 12)")
        self.tasks = tuple(tasks)
        self.max_count = max_count
        self.heldout_fraction = heldout_fraction
        self.answers = answers(max_count)
        self._lengths: dict[tuple[str, str], int] = {}
        grid = encoder.image_processor.grid(self.image_size, self.image_size)
        self.grids = [grid]
        self.max_tiles_per_sample = encoder.tiles_per_image(grid)

    def __len__(self) -> int:
        return self.size

    @property
    def pad_token_id(self) -> int:
        return self.encoder.pad_token_id

    # ---- scenes --------------------------------------------------------------------------
    def _draw_shape(self, rng: np.random.Generator, cell: tuple[int, int], n_cells: int = 3) -> Shape:
        """A random shape inside `cell` of an n_cells x n_cells grid over the canvas."""
        c = self.image_size * SUPERSAMPLE / n_cells
        r = int(rng.integers(round(c * 0.26), round(c * 0.40) + 1))
        jitter = max(int(c / 2 - r - SUPERSAMPLE), 0)  # keep a pixel of margin inside the cell
        cx = int(round(c * (cell[1] + 0.5))) + int(rng.integers(-jitter, jitter + 1))
        cy = int(round(c * (cell[0] + 0.5))) + int(rng.integers(-jitter, jitter + 1))
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        color = tuple(COLORS)[int(rng.integers(len(COLORS)))]
        if kind == "square":  # a little smaller than its circle, so that area does not give it away
            r = round(r * 0.85)
        return Shape(cx, cy, r, kind, color)

    def _candidate(self, rng: np.random.Generator, task: str) -> Scene:
        cells = [(r, c) for r in range(3) for c in range(3)]
        if task in ("shape", "color"):  # one large shape: the whole canvas is its cell
            s = self._draw_shape(rng, (0, 0), n_cells=1)
            return Scene(task, (s,), s.kind if task == "shape" else s.color)
        if task == "position":
            where = tuple(POSITIONS)[int(rng.integers(len(POSITIONS)))]
            return Scene(task, (self._draw_shape(rng, POSITIONS[where]),), where)
        k = int(rng.integers(1, self.max_count + 1))
        chosen = rng.choice(9, size=k, replace=False)
        shapes = tuple(sorted(self._draw_shape(rng, cells[int(j)]) for j in chosen))
        return Scene(task, shapes, str(k))

    def scene(self, i: int) -> Scene:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} samples")
        task = self.tasks[i % len(self.tasks)]
        for attempt in range(10_000):
            scene = self._candidate(np.random.default_rng([self.seed, i, attempt]), task)
            if split_of(scene, self.heldout_fraction) == self.split:
                return scene
        raise RuntimeError(f"no {self.split} scene found for index {i}")  # probability ~0

    def image(self, i: int) -> Image.Image:
        return render(self.scene(i), self.image_size)

    def question(self, i: int) -> str:
        return self.scene(i).question

    def answer(self, i: int) -> str:
        return self.scene(i).answer

    def messages(self, scene: Scene) -> list[dict]:
        return [{"role": "user", "content": scene.question}, {"role": "assistant", "content": scene.answer}]

    # ---- samples -------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        scene = self.scene(i)
        return self.encoder.encode([render(scene, self.image_size)], self.messages(scene))

    def prompt(self, i: int) -> dict:
        """Generation inputs for sample i (question only); compare the output with `answer(i)`."""
        scene = self.scene(i)
        return self.encoder.encode_prompt([render(scene, self.image_size)], scene.question)

    def sample_shape(self, i: int) -> tuple[int, int]:
        """(T, n tiles) of sample i without drawing it."""
        scene = self.scene(i)
        k = (scene.task, scene.answer)
        if k not in self._lengths:
            self._lengths[k] = self.encoder.num_tokens(self.grids, self.messages(scene))
        return self._lengths[k], self.max_tiles_per_sample

    def __repr__(self) -> str:
        return f"SyntheticShapesDataset(split={self.split!r}, size={self.size}, seed={self.seed}, image_size={self.image_size})"
