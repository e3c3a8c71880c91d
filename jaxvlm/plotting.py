"""A dependency-free line plot (pillow only) for the loss curve."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from conversion.atomic import atomic_file


def plot_curve(
    points: list[tuple[float, float]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (720, 420),
) -> None:
    """Draw y(x) with axes, min/max labels and a title; write a PNG to `path`."""
    W, H = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_px(x, y):
        return (
            left + (x - x0) / (x1 - x0) * (W - left - right),
            H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom),
        )

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for k in range(1, 4):  # light grid
        gy = top + k * (H - top - bottom) / 4
        d.line([left, gy, W - right, gy], fill=(225, 225, 225))
    d.line(
        [to_px(x, y) for x, y in points] if len(points) > 1 else [to_px(xs[0], ys[0])] * 2, fill=(30, 90, 200), width=2
    )
    d.text((W / 2 - 3 * len(title), 12), title, fill="black")
    d.text((left - 60, top - 5), f"{y1:.3g}", fill="black")
    d.text((left - 60, H - bottom - 8), f"{y0:.3g}", fill="black")
    d.text((left, H - bottom + 6), f"{x0:g}", fill="black")
    d.text((W - right - 40, H - bottom + 6), f"{x1:g}", fill="black")
    d.text((W / 2 - 3 * len(xlabel), H - 22), xlabel, fill="black")
    d.text((5, H / 2), ylabel, fill="black")
    with atomic_file(path, "wb") as f:
        img.save(f, format="PNG")
