"""Generate a small, realistic-looking camera-trap demo dataset (no download needed).

Each "location" is a camera with its own background (sky, ground colour, texture,
horizon height); each class is an animal-like shape with its own colour and form.
Animals move across a few frames per sequence, as in a real burst. The CCT file has
boxes, sequences, times, and some sequences without a location, so every step of
data preparation (including the missing-location rule) runs on it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from classification.errors import UserError
from classification.io import atomic_open, write_json_atomic

IMAGE_SIZE = (320, 240)


@dataclass(frozen=True)
class DemoClass:
    """An animal-like shape: body colour, body aspect (w/h), relative size, legs or not."""

    name: str
    colour: tuple[int, int, int]
    aspect: float
    size: float
    legs: bool


DEMO_CLASSES = (
    DemoClass("deer", (150, 100, 55), 1.6, 0.30, True),
    DemoClass("wild_boar", (45, 40, 38), 1.4, 0.26, True),
    DemoClass("bird", (205, 60, 40), 0.8, 0.12, False),
    DemoClass("rabbit", (170, 160, 145), 1.0, 0.14, False),
)


@dataclass(frozen=True)
class DemoLocation:
    """One camera: its name, which classes visit it, and its background look."""

    name: str | None
    classes: tuple[str, ...]
    ground: tuple[int, int, int]
    sky: tuple[int, int, int]
    horizon: float


def random_colour(rng: np.random.Generator, low: int, high: int) -> tuple[int, int, int]:
    """An RGB colour with each channel drawn from [low, high)."""
    red, green, blue = (int(v) for v in rng.integers(low, high, size=3))
    return red, green, blue


def demo_locations(rng: np.random.Generator, n_locations: int) -> list[DemoLocation]:
    """Cameras with distinct backgrounds, each visited by 2-3 classes (as in real data)."""
    names = [c.name for c in DEMO_CLASSES]
    locations = []
    for k in range(n_locations):
        visiting = tuple(sorted(rng.choice(names, size=int(rng.integers(2, 4)), replace=False).tolist()))
        ground = random_colour(rng, 60, 160)
        sky = random_colour(rng, 150, 230)
        locations.append(DemoLocation(f"Site {k + 1:02d}", visiting, ground, sky, float(rng.uniform(0.25, 0.5))))
    # One camera whose station name was never recorded: its sequences test the missing-location rule.
    locations.append(DemoLocation(None, tuple(names[:2]), (90, 110, 70), (190, 200, 210), 0.35))
    return locations


def draw_background(location: DemoLocation, rng: np.random.Generator) -> Image.Image:
    """Sky above a textured ground, with a little sensor noise."""
    width, height = IMAGE_SIZE
    horizon = int(height * location.horizon)
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:horizon] = location.sky
    pixels[horizon:] = location.ground
    texture = rng.normal(0, 18, size=(height // 8, width // 8, 1)).repeat(8, 0).repeat(8, 1)
    pixels[horizon:] += texture[horizon:]
    pixels += rng.normal(0, 4, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(1))


def draw_animal(image: Image.Image, kind: DemoClass, centre: tuple[float, float], scale: float) -> list[float]:
    """Draw one animal; return its box ``[x, y, w, h]`` in pixels, clipped to the image."""
    width, height = image.size
    body_w = kind.size * width * scale
    body_h = body_w / kind.aspect
    cx, cy = centre
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = cx - body_w / 2, cy - body_h / 2, cx + body_w / 2, cy + body_h / 2
    draw.ellipse([left, top, right, bottom], fill=kind.colour)
    head = body_h * 0.45
    draw.ellipse([right - head * 0.6, top - head * 0.5, right + head * 0.6, top + head * 0.7], fill=kind.colour)
    top = min(top, top - head * 0.5)
    right = right + head * 0.6
    if kind.legs:
        leg = body_h * 0.7
        for fx in (0.25, 0.4, 0.65, 0.8):
            x = left + fx * body_w
            draw.line([x, bottom - 2, x, bottom + leg], fill=kind.colour, width=max(2, int(body_w / 25)))
        bottom += leg
    x0, y0 = max(0.0, left), max(0.0, top)
    x1, y1 = min(float(width), right), min(float(height), bottom)
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def make_sequence(
    location: DemoLocation, seq_id: str, start: dt.datetime, rng: np.random.Generator, n_frames: int
) -> list[tuple[Image.Image, list[tuple[str, list[float]]]]]:
    """Frames of one burst: one or two animals of the location's classes walking across."""
    by_name = {c.name: c for c in DEMO_CLASSES}
    width, height = IMAGE_SIZE
    n_animals = 1 if rng.random() < 0.8 else 2
    animals = [
        (by_name[str(rng.choice(location.classes))], float(rng.uniform(0.2, 0.8)) * width,
         float(rng.uniform(location.horizon + 0.2, 0.8)) * height, float(rng.uniform(-12, 12)), float(rng.uniform(0.8, 1.3)))
        for _ in range(n_animals)
    ]
    background = draw_background(location, rng)
    frames = []
    for frame in range(n_frames):
        image = background.copy()
        boxes = [(kind.name, draw_animal(image, kind, (x + dx * frame, y), scale)) for kind, x, y, dx, scale in animals]
        frames.append((image, boxes))
    return frames


def image_record(file_name: str, seq_id: str, frame: int, n_frames: int, location: DemoLocation, time: dt.datetime) -> dict[str, Any]:
    """A CCT image entry."""
    return {
        "id": file_name.rsplit(".", 1)[0], "file_name": file_name, "width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1],
        "location": location.name, "datetime": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seq_id": seq_id, "seq_num_frames": n_frames, "frame_num": frame,
    }


def make_demo_dataset(output_dir: Path, n_locations: int = 8, sequences_per_location: int = 6,
                      frames_per_sequence: int = 3, seed: int = 0) -> Path:
    """Write ``images/<location>/<seq>_<frame>.jpg`` and ``demo_cct.json``; return the CCT path."""
    counts = {"--locations": n_locations, "--sequences": sequences_per_location, "--frames": frames_per_sequence}
    for flag, count in counts.items():
        if count < 1:
            raise UserError(f"{flag} must be at least 1, got {count}")
    if seed < 0:  # numpy's generators take none
        raise UserError(f"--seed must be 0 or more, got {seed}")
    rng = np.random.default_rng(seed)
    categories = {c.name: i for i, c in enumerate(DEMO_CLASSES, start=1)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    start = dt.datetime(2024, 5, 1, 6, 0, 0)
    for k, location in enumerate(demo_locations(rng, n_locations)):
        folder = (location.name or "unknown_camera").replace(" ", "_").lower()
        for s in range(sequences_per_location):
            seq_id = f"{folder}_seq{s:02d}"
            time = start + dt.timedelta(days=k, hours=3 * s, minutes=int(rng.integers(0, 60)))
            for frame, (image, boxes) in enumerate(make_sequence(location, seq_id, time, rng, frames_per_sequence)):
                file_name = f"{folder}/{seq_id}_{frame}.jpg"
                with atomic_open(output_dir / "images" / file_name, "wb") as handle:
                    image.save(handle, format="JPEG", quality=90)
                record = image_record(file_name, seq_id, frame, frames_per_sequence, location, time + dt.timedelta(seconds=frame))
                images.append(record)
                for name, bbox in boxes:
                    annotations.append({"id": f"ann{len(annotations):05d}", "image_id": record["id"],
                                        "category_id": categories[name], "bbox": bbox})
    cct = {
        "info": {"description": "synthetic camera-trap demo data generated by classification.demo", "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for name, i in categories.items()],
    }
    cct_path = output_dir / "demo_cct.json"
    write_json_atomic(cct_path, cct)
    return cct_path
