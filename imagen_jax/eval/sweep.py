"""A guidance-weight sweep: FID against CLIP score, as Imagen's figure A.5 plots it.

For each guidance weight w the same prompts are sampled into `OUT/w{w}/` and scored; each
point is saved in `OUT/w{w}/metrics.json` as soon as it is known, so a killed sweep resumes
at the first weight without one. `write_report` writes `OUT/sweep.json`, a Markdown table
`OUT/sweep.md` and the plot `OUT/fid_vs_clip.png` (CLIP score on x, FID on y, each point
labelled with its weight: the Pareto curve of Saharia et al. 2022, figure A.5).

Sampling and scoring are callables, so the sweep is the same loop whatever produces the
images (the `imagen-eval sweep` command passes `imagen-sample` and the FID and CLIP-score
evaluations).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

from etils import epath
from PIL import Image, ImageDraw, ImageFont

from imagen_jax import files
from imagen_jax.errors import UserError

METRICS_FILE = "metrics.json"


@dataclasses.dataclass(frozen=True)
class SweepPoint:
  guidance: float
  fid: float
  clip_score: float
  samples_dir: str


def point_dir(out_dir: str | os.PathLike, guidance: float) -> epath.Path:
  return epath.Path(out_dir) / f"w{guidance:g}"


def parse_weights(text: str) -> list[float]:
  """'1,3,5.5' -> [1.0, 3.0, 5.5]; each weight >= 0, no repeats."""
  try:
    weights = [float(part) for part in text.split(",") if part.strip()]
  except ValueError as e:
    raise UserError(f"--guidance={text!r}: give comma-separated numbers, e.g. 1,3,5,7") from e
  if not weights or any(w < 0 for w in weights) or len(set(weights)) != len(weights):
    raise UserError(f"--guidance={text!r}: give distinct weights >= 0, e.g. 1,3,5,7")
  return weights


def run_sweep(guidances: Sequence[float], sample: Callable[[float, epath.Path], None],
              evaluate: Callable[[epath.Path], tuple[float, float]],
              out_dir: str | os.PathLike) -> list[SweepPoint]:
  """sample(w, dir) writes images; evaluate(dir) -> (fid, clip_score). Resumable."""
  points = []
  for w in guidances:
    directory = point_dir(out_dir, w)
    saved = directory / METRICS_FILE
    if saved.exists():
      points.append(SweepPoint(**json.loads(saved.read_text())))
      continue
    sample(w, directory)
    fid, clip = evaluate(directory)
    point = SweepPoint(float(w), float(fid), float(clip), os.fspath(directory))
    files.write_atomic(saved, json.dumps(dataclasses.asdict(point)) + "\n")
    points.append(point)
  return points


def table(points: Sequence[SweepPoint]) -> str:
  rows = ["| guidance w | FID | CLIP score |", "|---|---|---|"]
  rows += [f"| {p.guidance:g} | {p.fid:.2f} | {p.clip_score:.2f} |" for p in points]
  return "\n".join(rows) + "\n"


def plot(points: Sequence[SweepPoint], size: tuple[int, int] = (640, 480)) -> Image.Image:
  """FID (y) against CLIP score (x), points joined in weight order and labelled w=..."""
  width, height = size
  left, right, top, bottom = 70, 20, 30, 50
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default(size=12)
  xs = [p.clip_score for p in points]
  ys = [p.fid for p in points]

  def span(values):
    low, high = min(values), max(values)
    pad = (high - low) * 0.1 or max(abs(high) * 0.05, 1e-3)
    return low - pad, high + pad

  (x0, x1), (y0, y1) = span(xs), span(ys)

  def to_pixel(x, y):
    return (left + (x - x0) / (x1 - x0) * (width - left - right),
            top + (y1 - y) / (y1 - y0) * (height - top - bottom))

  draw.rectangle([left, top, width - right, height - bottom], outline="black")
  for i in range(5):  # ticks with values on both axes
    fx, fy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
    px, _ = to_pixel(fx, y0)
    _, py = to_pixel(x0, fy)
    draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
    draw.text((px - 14, height - bottom + 6), f"{fx:.2f}", fill="black", font=font)
    draw.line([left - 4, py, left, py], fill="black")
    draw.text((4, py - 6), f"{fy:.2f}", fill="black", font=font)
  draw.text((width // 2 - 40, height - 20), "CLIP score", fill="black", font=font)
  draw.text((4, 8), "FID (lower is better)", fill="black", font=font)
  pixels = [to_pixel(x, y) for x, y in zip(xs, ys)]
  if len(pixels) > 1:
    draw.line(pixels, fill=(40, 90, 200), width=2)
  for (px, py), p in zip(pixels, points):
    draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(200, 40, 40))
    draw.text((px + 6, py - 14), f"w={p.guidance:g}", fill="black", font=font)
  return image


def write_report(points: Sequence[SweepPoint], out_dir: str | os.PathLike) -> None:
  out_dir = epath.Path(out_dir)
  (out_dir / "sweep.json").write_text(
      json.dumps([dataclasses.asdict(p) for p in points], indent=1) + "\n")
  (out_dir / "sweep.md").write_text(table(points))
  with (out_dir / "fid_vs_clip.png").open("wb") as f:
    plot(points).save(f, format="PNG")
