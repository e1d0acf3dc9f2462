"""The scenes of the built-in benchmark (crnet.data.synthetic writes them as a VOC tree).

Twenty object classes, split into four folds of five like PASCAL-5i (fold i holds class ids 5i+1 .. 5i+5).
A class is an object family: a shape family, a texture family and a broad hue distribution. Hues overlap
between classes and with the background, so colour alone does not name a class; shape and texture do.
Every image has one "main" class (one or two instances), up to three distractor objects of other classes,
a cluttered textured background, occlusion, and a 255 "ignore" band on every label boundary as in VOC.

Every image draws from its own generator seeded with (seed, split, index), so an image does not depend on
the order in which images are made.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IGNORE_INDEX = 255
NUM_CLASSES = 20

Array = np.ndarray


@dataclass(frozen=True)
class ClassSpec:
    """How one class looks. Angles in degrees; texture period in object radii (rays: ray count)."""

    name: str
    shape: str
    texture: str
    hue: float  # centre of the primary hue range
    hue_spread: float  # primary hue is uniform in hue +- hue_spread
    second: tuple[float, float, float]  # secondary colour: hue offset, saturation factor, value factor
    period: float
    angle: float  # texture orientation relative to the object's own axis


# Every texture family is used by two classes and six shape families by two, so neither alone names a class;
# hue ranges are 60 degrees wide and overlap those of 2-4 other classes.
CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("striped star", "star", "stripes", 45, 30, (0, 0.9, 0.35), 0.30, 0),
    ClassSpec("dotted blob", "blob", "dots", 0, 30, (0, 0.25, 1.4), 0.36, 0),
    ClassSpec("checker box", "box", "checker", 215, 30, (0, 0.2, 1.5), 0.38, 0),
    ClassSpec("rayed ring", "ring", "rays", 125, 30, (40, 0.9, 0.5), 10, 0),
    ClassSpec("camo cross", "cross", "camo", 85, 30, (-35, 1.0, 0.5), 0.55, 0),
    ClassSpec("gradient moon", "crescent", "gradient", 50, 30, (-45, 1.0, 0.7), 1.0, 0),
    ClassSpec("spotted heart", "heart", "spots", 340, 30, (0, 0.5, 0.3), 0.32, 20),
    ClassSpec("ringed gear", "gear", "rings", 195, 30, (0, 0.3, 1.4), 0.24, 0),
    ClassSpec("hatched triangle", "triangle", "hatch", 20, 30, (0, 0.6, 0.3), 0.26, 45),
    ClassSpec("wavy dumbbell", "dumbbell", "waves", 275, 30, (60, 0.8, 1.2), 0.30, 0),
    ClassSpec("dotted clover", "trefoil", "dots", 105, 30, (180, 0.8, 1.1), 0.30, 30),
    ClassSpec("striped arrow", "arrow", "stripes", 355, 30, (0, 0.1, 1.5), 0.34, 90),
    ClassSpec("checker bowtie", "bowtie", "checker", 30, 30, (0, 0.7, 0.35), 0.30, 45),
    ClassSpec("gradient chevron", "chevron", "gradient", 235, 30, (-55, 1.0, 1.1), 1.0, 90),
    ClassSpec("camo blob", "blob", "camo", 70, 30, (25, 0.8, 0.45), 0.45, 0),
    ClassSpec("ringed star", "star", "rings", 300, 30, (0, 0.3, 1.4), 0.26, 0),
    ClassSpec("wavy box", "box", "waves", 175, 30, (0, 0.5, 0.4), 0.28, 90),
    ClassSpec("spotted moon", "crescent", "spots", 12, 30, (35, 0.9, 1.3), 0.28, 0),
    ClassSpec("hatched heart", "heart", "hatch", 155, 30, (0, 0.6, 0.3), 0.24, 0),
    ClassSpec("rayed cross", "cross", "rays", 255, 30, (60, 0.6, 1.3), 8, 0),
)
CLASS_NAMES: tuple[str, ...] = tuple(spec.name for spec in CLASSES)
FOLDS: tuple[tuple[int, ...], ...] = tuple(tuple(range(5 * f + 1, 5 * f + 6)) for f in range(4))


# --------------------------------------------------------------------------------------------- geometry
# Shapes are signed distance functions of object coordinates (u, v): the object spans about [-1, 1]^2,
# negative inside. Distances are approximate, which only matters for the one-pixel anti-aliasing ramp.


def _box(u: Array, v: Array, hx: float, hy: float) -> Array:
    qx, qy = np.abs(u) - hx, np.abs(v) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _disc(u: Array, v: Array, cx: float, cy: float, r: float) -> Array:
    return np.hypot(u - cx, v - cy) - r


def _segment(u: Array, v: Array, a: tuple[float, float], b: tuple[float, float]) -> Array:
    """Distance to the segment a-b (a capsule once a radius is subtracted)."""
    ex, ey = b[0] - a[0], b[1] - a[1]
    h = np.clip(((u - a[0]) * ex + (v - a[1]) * ey) / (ex * ex + ey * ey), 0, 1)
    return np.hypot(u - a[0] - h * ex, v - a[1] - h * ey)


def _convex(u: Array, v: Array, pts: list[tuple[float, float]]) -> Array:
    """Convex polygon as the max of its edge half-planes (exact inside, close enough outside)."""
    cx, cy = np.mean([p[0] for p in pts]), np.mean([p[1] for p in pts])
    d = np.full(u.shape, -np.inf)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
        nx, ny = y1 - y0, x0 - x1
        norm = math.hypot(nx, ny)
        if nx * (cx - x0) + ny * (cy - y0) > 0:  # make the normal point outwards
            nx, ny = -nx, -ny
        d = np.maximum(d, ((u - x0) * nx + (v - y0) * ny) / norm)
    return d


def _polar(u: Array, v: Array) -> tuple[Array, Array]:
    return np.hypot(u, v), np.arctan2(v, u)


def _shape_blob(u: Array, v: Array, rng: np.random.Generator) -> Array:
    r, th = _polar(u, v)
    radius = 0.85 * np.ones_like(th)
    for k, amp in ((2, 0.12), (3, 0.09), (5, 0.04)):
        radius += 0.85 * rng.uniform(0, amp) * np.cos(k * th + rng.uniform(0, 2 * np.pi))
    return (r - radius) * 0.85


def _shape_star(u: Array, v: Array, rng: np.random.Generator) -> Array:
    n, inner = int(rng.choice([5, 6])), rng.uniform(0.38, 0.52)
    r, th = _polar(u, v)
    phase = np.mod(th * n / (2 * np.pi), 1.0)
    radius = inner + (1.0 - inner) * np.abs(phase - 0.5) * 2
    return (r - radius) * 0.5


def _shape_crescent(u: Array, v: Array, rng: np.random.Generator) -> Array:
    outer = _disc(u, v, -0.1, 0, 0.95)
    bite = _disc(u, v, rng.uniform(0.3, 0.5), rng.uniform(-0.15, 0.15), rng.uniform(0.7, 0.85))
    return np.maximum(outer, -bite)


def _shape_ring(u: Array, v: Array, rng: np.random.Generator) -> Array:
    return np.abs(np.hypot(u, v) - rng.uniform(0.62, 0.72)) - rng.uniform(0.22, 0.3)


def _shape_cross(u: Array, v: Array, rng: np.random.Generator) -> Array:
    w = rng.uniform(0.24, 0.33)
    return np.minimum(_box(u, v, 0.95, w), _box(u, v, w, 0.95))


def _shape_triangle(u: Array, v: Array, rng: np.random.Generator) -> Array:
    r = 0.9
    pts = [(r * math.cos(a), r * math.sin(a)) for a in np.radians([-90, 30, 150])]
    return _convex(u, v - 0.1, pts) - rng.uniform(0.04, 0.1)


def _shape_heart(u: Array, v: Array, rng: np.random.Generator) -> Array:
    lobe = rng.uniform(0.46, 0.52)
    tip = [(-0.95, -0.2), (0.95, -0.2), (0.0, rng.uniform(0.85, 1.0))]
    return np.minimum.reduce(
        [_disc(u, v, -0.45, -0.4, lobe), _disc(u, v, 0.45, -0.4, lobe), _convex(u, v, tip)]
    )


def _shape_gear(u: Array, v: Array, rng: np.random.Generator) -> Array:
    teeth = int(rng.integers(8, 12))
    r, th = _polar(u, v)
    square = np.clip(2.5 * np.sin(teeth * th + rng.uniform(0, 2 * np.pi)), -1, 1)
    body = (r - (0.8 + 0.15 * square)) * 0.6
    return np.maximum(body, rng.uniform(0.2, 0.28) - r)


def _shape_dumbbell(u: Array, v: Array, rng: np.random.Generator) -> Array:
    r = rng.uniform(0.32, 0.4)
    bar = _box(u, v, 0.62, rng.uniform(0.11, 0.17))
    return np.minimum.reduce([_disc(u, v, -0.6, 0, r), _disc(u, v, 0.6, 0, r), bar])


def _shape_trefoil(u: Array, v: Array, rng: np.random.Generator) -> Array:
    r, d = rng.uniform(0.42, 0.5), 0.5
    lobes = [_disc(u, v, d * math.cos(a), d * math.sin(a), r) for a in np.radians([-90, 30, 150])]
    return np.minimum.reduce([*lobes, _disc(u, v, 0, 0, 0.35)])


def _shape_arrow(u: Array, v: Array, rng: np.random.Generator) -> Array:
    w = rng.uniform(0.13, 0.19)
    head = [(0.05, -0.6), (1.0, 0.0), (0.05, 0.6)]
    return np.minimum(_box(u + 0.4, v, 0.55, w), _convex(u, v, head))


def _shape_box(u: Array, v: Array, rng: np.random.Generator) -> Array:
    hy, corner = rng.uniform(0.55, 0.75), rng.uniform(0.05, 0.2)
    return _box(u, v, 0.9 - corner, hy - corner) - corner


def _shape_bowtie(u: Array, v: Array, rng: np.random.Generator) -> Array:
    h = rng.uniform(0.6, 0.8)
    left = _convex(u, v, [(-0.95, -h), (-0.95, h), (0.05, 0.0)])
    right = _convex(u, v, [(0.95, -h), (0.95, h), (-0.05, 0.0)])
    return np.minimum.reduce([left, right, _box(u, v, 0.16, 0.22)])


def _shape_chevron(u: Array, v: Array, rng: np.random.Generator) -> Array:
    w, apex = rng.uniform(0.16, 0.23), (0.0, -0.55)
    arms = np.minimum(_segment(u, v, apex, (-0.75, 0.6)), _segment(u, v, apex, (0.75, 0.6)))
    return arms - w


SHAPES: dict[str, Callable[[Array, Array, np.random.Generator], Array]] = {
    "blob": _shape_blob,
    "star": _shape_star,
    "crescent": _shape_crescent,
    "ring": _shape_ring,
    "cross": _shape_cross,
    "triangle": _shape_triangle,
    "heart": _shape_heart,
    "gear": _shape_gear,
    "dumbbell": _shape_dumbbell,
    "trefoil": _shape_trefoil,
    "arrow": _shape_arrow,
    "box": _shape_box,
    "bowtie": _shape_bowtie,
    "chevron": _shape_chevron,
}


# --------------------------------------------------------------------------------------------- textures
# A texture maps coordinates to a mixing weight t in [0, 1] between a primary and a secondary colour.
# Edges are soft ramps rather than steps so that fine patterns do not alias into noise.


def _ramp(x: Array, gain: float = 2.5) -> Array:
    return np.clip(0.5 + gain * x, 0.0, 1.0)


def _turn(u: Array, v: Array, angle: float) -> tuple[Array, Array]:
    c, s = math.cos(angle), math.sin(angle)
    return c * u + s * v, -s * u + c * v


def _tex_stripes(u: Array, v: Array, period: float, angle: float, rng: np.random.Generator) -> Array:
    s, _ = _turn(u, v, angle)
    return _ramp(np.sin(2 * np.pi * s / period + rng.uniform(0, 2 * np.pi)))


def _tex_waves(u: Array, v: Array, period: float, angle: float, rng: np.random.Generator) -> Array:
    s, w = _turn(u, v, angle)
    s = s + rng.uniform(0.08, 0.14) * np.sin(2 * np.pi * w / rng.uniform(0.55, 0.8) + rng.uniform(0, 6))
    return _ramp(np.sin(2 * np.pi * s / period + rng.uniform(0, 2 * np.pi)))


def _tex_dots(u: Array, v: Array, period: float, angle: float, rng: np.random.Generator) -> Array:
    s, w = _turn(u, v, angle)
    gx = np.mod(s / period + rng.uniform(0, 1), 1.0) - 0.5
    gy = np.mod(w / period + rng.uniform(0, 1), 1.0) - 0.5
    return _ramp(rng.uniform(0.25, 0.33) - np.hypot(gx, gy), 8.0)


def _tex_spots(u: Array, v: Array, period: float, angle: float, rng: np.random.Generator) -> Array:
    """Irregular leopard-like spots: one jittered spot per cell, chosen by a hash of the cell index."""
    s, w = _turn(u, v, angle)
    s, w = s / period, w / period
    ci, cj = np.floor(s), np.floor(w)
    key = rng.uniform(0, 1000)

    def cell_hash(k: float) -> Array:
        return np.mod(np.sin(ci * 12.9898 + cj * 78.233 + key + k) * 43758.5453, 1.0)

    cx = ci + 0.5 + (cell_hash(1.0) - 0.5) * 0.35
    cy = cj + 0.5 + (cell_hash(2.0) - 0.5) * 0.35
    radius = np.where(cell_hash(3.0) < 0.8, 0.15 + 0.17 * cell_hash(4.0), 0.0)
    return _ramp(radius - np.hypot(s - cx, w - cy), 8.0)


def _tex_checker(u: Array, v: Array, period: float, angle: float, rng: np.random.Generator) -> Array:
    s, w = _turn(u, v, angle)
    ps, pw = rng.uniform(0, 2 * np.pi, size=2)
    return _ramp(np.sin(np.pi * s / period + ps) * np.sin(np.pi * w / period + pw), 3.0)


def _tex_rings(u: Array, v: Array, period: float, angle: float, rng: np.random.Generator) -> Array:
    ox, oy = rng.uniform(-0.2, 0.2, size=2)
    return _ramp(np.sin(2 * np.pi * np.hypot(u - ox, v - oy) / period + rng.uniform(0, 2 * np.pi)))


def _tex_rays(u: Array, v: Array, period: float, angle: float, rng: np.random.Generator) -> Array:
    ox, oy = rng.uniform(-0.15, 0.15, size=2)
    count = max(3, round(period))
    return _ramp(np.sin(count * np.arctan2(v - oy, u - ox) + rng.uniform(0, 2 * np.pi)), 2.0)


def _tex_camo(u: Array, v: Array, period: float, angle: float, rng: np.random.Generator) -> Array:
    """Blotches: the sign of a sum of a few random plane waves of about the given period."""
    field = np.zeros_like(u)
    for _ in range(5):
        a, k = rng.uniform(0, np.pi), 2 * np.pi / (period * rng.uniform(0.7, 1.4))
        s, _ = _turn(u, v, a)
        field += np.sin(k * s + rng.uniform(0, 2 * np.pi))
    return _ramp(field, 0.9)


def _tex_gradient(u: Array, v: Array, period: float, angle: float, rng: np.random.Generator) -> Array:
    s, _ = _turn(u, v, angle)
    t = np.clip(0.5 + 0.6 * s / period + rng.uniform(-0.1, 0.1), 0.0, 1.0)
    return t * t * (3 - 2 * t)  # smoothstep: a soft two-tone blend


def _tex_hatch(u: Array, v: Array, period: float, angle: float, rng: np.random.Generator) -> Array:
    """Thin crossed lines."""
    out = np.zeros_like(u)
    for extra in (0.0, np.pi / 2 + rng.uniform(-0.2, 0.2)):
        s, _ = _turn(u, v, angle + extra)
        line = np.abs(np.sin(np.pi * s / period + rng.uniform(0, np.pi)))
        out = np.maximum(out, _ramp(0.3 - line, 4.0))
    return out


TEXTURES: dict[str, Callable[[Array, Array, float, float, np.random.Generator], Array]] = {
    "stripes": _tex_stripes,
    "waves": _tex_waves,
    "dots": _tex_dots,
    "spots": _tex_spots,
    "checker": _tex_checker,
    "rings": _tex_rings,
    "rays": _tex_rays,
    "camo": _tex_camo,
    "gradient": _tex_gradient,
    "hatch": _tex_hatch,
}
_GENERIC_PERIOD = {"rays": (6.0, 14.0), "gradient": (0.8, 1.5)}  # other families: (0.2, 0.5)


# --------------------------------------------------------------------------------------------- colour


def _hsv(h_deg: float, s: float, v: float) -> Array:
    r, g, b = colorsys.hsv_to_rgb((h_deg % 360) / 360, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return np.array([r, g, b]) * 255.0


def _class_colours(spec: ClassSpec, rng: np.random.Generator) -> tuple[Array, Array]:
    """Primary and secondary colour of one instance, jittered within the class's broad ranges."""
    hue = spec.hue + rng.uniform(-spec.hue_spread, spec.hue_spread)
    sat, val = rng.uniform(0.45, 0.95), rng.uniform(0.5, 0.95)
    dh, fs, fv = spec.second
    second = _hsv(
        hue + dh + rng.normal(0, 10), sat * fs * rng.uniform(0.8, 1.2), val * fv * rng.uniform(0.8, 1.2)
    )
    return _hsv(hue, sat, val), second


def _random_colour(rng: np.random.Generator) -> Array:
    """Clutter colour: half the time drawn like some class's colour, so colour never separates them."""
    if rng.random() < 0.5:
        return _class_colours(CLASSES[rng.integers(NUM_CLASSES)], rng)[int(rng.integers(2))]
    return _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.9), rng.uniform(0.15, 0.95))


# --------------------------------------------------------------------------------------------- painting


@dataclass
class _Canvas:
    image: Array  # float32 H x W x 3 in [0, 255]
    label: Array  # uint8 H x W, no ignore band yet
    instance: Array  # int16 H x W: which object is visible (-1: none), to check occlusion

    @property
    def size(self) -> int:
        return self.image.shape[0]


def _blend(canvas: _Canvas, box: tuple[slice, slice], alpha: Array, colour: Array) -> None:
    region = canvas.image[box]
    region += alpha[..., None] * (colour - region)


def _object_frame(
    size: int, cx: float, cy: float, radius: float, extent: float
) -> tuple[tuple[slice, slice], Array, Array] | None:
    """Pixel-centre grid of the bounding box of a disc, clipped to the image; None if it is off-image."""
    x0, x1 = max(0, int(cx - extent)), min(size, int(math.ceil(cx + extent)))
    y0, y1 = max(0, int(cy - extent)), min(size, int(math.ceil(cy + extent)))
    if x0 >= x1 or y0 >= y1:
        return None
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    return (slice(y0, y1), slice(x0, x1)), (xs - cx) / radius, (ys - cy) / radius


def _paint_object(canvas: _Canvas, rng: np.random.Generator, cls: int, radius: float, instance: int) -> int:
    """Paint one object of class `cls` over the canvas; returns its area in pixels."""
    spec, size = CLASSES[cls - 1], canvas.size
    cx, cy = rng.uniform(0.15, 0.85, size=2) * size
    aspect = math.exp(rng.uniform(-0.22, 0.22))
    frame = _object_frame(size, cx, cy, radius, radius * 1.5 * max(aspect, 1 / aspect) + 2)
    if frame is None:
        return 0
    box, dx, dy = frame
    u, v = _turn(dx, dy, rng.uniform(0, 2 * np.pi))
    u, v = u / aspect, v * aspect
    # Non-rigid deformation: a smooth random warp of the object's own coordinates.
    for _ in range(2):
        amp, freq, ph = rng.uniform(0.03, 0.1), rng.uniform(1.0, 2.8), rng.uniform(0, 2 * np.pi)
        u, v = u + amp * np.sin(freq * v + ph), v + amp * np.sin(freq * u + ph * 1.7)
    sd = SHAPES[spec.shape](u, v, rng) * radius
    alpha = np.clip(0.5 - sd, 0.0, 1.0)
    mask = sd < 0
    period = spec.period * rng.uniform(0.85, 1.15)
    angle = math.radians(spec.angle + rng.normal(0, 12))
    t = TEXTURES[spec.texture](u, v, period, angle, rng)
    primary, second = _class_colours(spec, rng)
    colour = primary + t[..., None] * (second - primary)
    lx, ly = rng.normal(0, 1, size=2)
    shade = 1 + rng.uniform(0.04, 0.18) * (lx * u + ly * v) / math.hypot(lx, ly)
    colour = colour * shade[..., None] + rng.normal(0, rng.uniform(1, 5), size=colour.shape)
    _blend(canvas, box, alpha, colour)
    canvas.label[box][mask] = cls
    canvas.instance[box][mask] = instance
    return int(mask.sum())


def _jagged_polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """A random star-convex polygon with uneven radii: clutter that matches no class's shape family."""
    n = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.3, 1.0, n)
    return [(cx + a * math.cos(b), cy + a * math.sin(b)) for a, b in zip(radii, angles, strict=True)]


def _coverage(
    size: int, pts: list[tuple[float, float]], pad: float, draw: Callable[[ImageDraw.ImageDraw, list], None]
) -> tuple[tuple[slice, slice], Array] | None:
    """Anti-aliased coverage of a PIL drawing of `pts` (drawn at 4x, box-filtered), on its bounding box."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = max(0, int(min(xs) - pad)), min(size, int(math.ceil(max(xs) + pad)))
    y0, y1 = max(0, int(min(ys) - pad)), min(size, int(math.ceil(max(ys) + pad)))
    if x0 >= x1 or y0 >= y1:
        return None
    big = Image.new("L", ((x1 - x0) * 4, (y1 - y0) * 4), 0)
    draw(ImageDraw.Draw(big), [((x - x0) * 4, (y - y0) * 4) for x, y in pts])
    small = big.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    return (slice(y0, y1), slice(x0, x1)), np.asarray(small, dtype=np.float32) / 255.0


def _polyline(rng: np.random.Generator, size: int) -> tuple[list[tuple[float, float]], float]:
    """A random wandering polyline (twig, wire, scratch) and its width in pixels."""
    x, y = rng.uniform(0, size, size=2)
    pts, heading = [(x, y)], rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(1, 4))):
        heading += rng.normal(0, 0.6)
        step = rng.uniform(0.05, 0.2) * size
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        pts.append((x, y))
    return pts, rng.uniform(0.8, 2.5)


def _paint_line(canvas: _Canvas, rng: np.random.Generator) -> tuple[tuple[slice, slice], Array] | None:
    pts, width = _polyline(rng, canvas.size)
    cover = _coverage(canvas.size, pts, width + 2, lambda d, q: d.line(q, fill=255, width=round(4 * width)))
    colour = _random_colour(rng)
    if cover is not None:
        _blend(canvas, *cover, colour)
    return cover


def _paint_clutter(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Background fragments (label 0): jagged polygons, flat or textured, and polylines."""
    size = canvas.size
    for _ in range(int(rng.integers(8, 18))):
        kind = rng.choice(["polygon", "textured", "line"], p=[0.4, 0.25, 0.35])
        if kind == "line":
            _paint_line(canvas, rng)
            continue
        r = rng.uniform(0.03, 0.1 if kind == "polygon" else 0.13) * size
        cx, cy = rng.uniform(0, size, size=2)
        cover = _coverage(size, _jagged_polygon(rng, cx, cy, r), 2, lambda d, q: d.polygon(q, fill=255))
        fill = _random_colour(rng) if kind == "polygon" else None
        if cover is None:
            continue
        if fill is None:
            fill = _texture_field(rng, cover[0], rng.uniform(0.5, 1.0) * r)
        _blend(canvas, *cover, fill)


def _texture_field(rng: np.random.Generator, box: tuple[slice, slice], scale: float) -> Array:
    """A random texture of any family, with random colours, over a box of the image (clutter, backdrop)."""
    name = str(rng.choice(list(TEXTURES)))
    lo, hi = _GENERIC_PERIOD.get(name, (0.2, 0.5))
    ys, xs = np.mgrid[box].astype(np.float32) + 0.5
    cx, cy = xs.mean() + rng.normal(0, scale), ys.mean() + rng.normal(0, scale)
    t = TEXTURES[name]((xs - cx) / scale, (ys - cy) / scale, rng.uniform(lo, hi), rng.uniform(0, np.pi), rng)
    a, b = _random_colour(rng), _random_colour(rng)
    return a + t[..., None] * (b - a)


def _background(rng: np.random.Generator, size: int) -> Array:
    """Low-frequency colour noise at two scales, sometimes overlaid with a faint large texture."""
    grid = int(rng.integers(2, 6))
    coarse = np.stack([_random_colour(rng) for _ in range(grid * grid)]).reshape(grid, grid, 3)
    img = Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    fine = rng.normal(0, rng.uniform(4, 16), size=(12, 12, 1)).astype(np.float32)
    fine_img = Image.fromarray(fine[..., 0]).resize((size, size), Image.Resampling.BICUBIC)
    out = out + np.asarray(fine_img, dtype=np.float32)[..., None]
    if rng.random() < 0.5:
        full = (slice(0, size), slice(0, size))
        out += rng.uniform(0.15, 0.4) * (_texture_field(rng, full, rng.uniform(0.15, 0.35) * size) - out)
    return out


def _paint_occluders(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Thin background lines in front of objects (twigs, wires): they cut through labels as 0."""
    for _ in range(int(rng.integers(1, 3))):
        cover = _paint_line(canvas, rng)
        if cover is not None:
            box, alpha = cover
            canvas.label[box][alpha > 0.5] = 0
            canvas.instance[box][alpha > 0.5] = -1


def render_sample(
    seed: int, split_index: int, index: int, main_class: int, image_size: int = 128
) -> tuple[Array, Array]:
    """One image (H x W x 3 uint8) and its label map before the ignore band (H x W uint8, 0..20).

    The main class always keeps at least one instance of which 40% or more is visible: layouts that
    occlude it more are redrawn, and late attempts drop the distractors so that one always succeeds.
    """
    if not 1 <= main_class <= NUM_CLASSES:
        raise ValueError(f"main_class must be in 1..{NUM_CLASSES}, got {main_class}")
    rng = np.random.default_rng([seed, split_index, index])
    size = image_size
    for attempt in range(12):
        canvas = _Canvas(
            _background(rng, size), np.zeros((size, size), np.uint8), np.full((size, size), -1, np.int16)
        )
        _paint_clutter(canvas, rng)
        n_main = 1 if rng.random() < 0.7 else 2
        n_distract = 0 if attempt >= 8 else int(rng.choice(4, p=[0.2, 0.4, 0.28, 0.12]))
        others = [c for c in range(1, NUM_CLASSES + 1) if c != main_class]
        objects = [main_class] * n_main + [int(c) for c in rng.choice(others, n_distract, replace=False)]
        order = rng.permutation(len(objects))
        areas = {}
        for inst in order:
            cls = objects[inst]
            if inst < n_main:  # main objects: bounding size ~40-75% of the side (smaller when there are two)
                radius = rng.uniform(0.2, 0.38) * size if n_main == 1 else rng.uniform(0.15, 0.26) * size
            else:  # distractors: ~20-40% of the side
                radius = rng.uniform(0.1, 0.2) * size
            areas[int(inst)] = _paint_object(canvas, rng, cls, radius, int(inst))
        if attempt < 8 and rng.random() < 0.35:
            _paint_occluders(canvas, rng)
        visible = np.bincount(canvas.instance.ravel() + 1, minlength=len(objects) + 1)[1:]
        if any(areas[i] > 0 and visible[i] >= 0.4 * areas[i] for i in range(n_main)):
            break
    noise = rng.normal(0, rng.uniform(1, 4), size=canvas.image.shape)
    image = np.clip(canvas.image * rng.uniform(0.85, 1.1) + noise, 0, 255).astype(np.uint8)
    return image, canvas.label


def ignore_band(label: Array, width: int = 1) -> Array:
    """Copy of `label` with 255 on every pixel within `width` (4-neighbour steps) of a label change.

    Both sides of a boundary are marked, so the band is 2 * width pixels wide, like the VOC void border.
    """
    edge = np.zeros(label.shape, bool)
    for a, b in ((np.s_[1:, :], np.s_[:-1, :]), (np.s_[:, 1:], np.s_[:, :-1])):
        diff = label[a] != label[b]
        edge[a] |= diff
        edge[b] |= diff
    for _ in range(width - 1):
        grown = edge.copy()
        grown[1:, :] |= edge[:-1, :]
        grown[:-1, :] |= edge[1:, :]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    out = label.copy()
    out[edge] = IGNORE_INDEX
    return out


def band_width(image_size: int) -> int:
    """Half-width of the ignore band: 1 px per side at 128 px, growing with the image."""
    return max(1, round(image_size / 128))
