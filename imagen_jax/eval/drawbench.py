"""DrawBench (Saharia et al. 2022, §4.2 and appendix A.3): 200 prompts in 11 categories,
scored with CLIP and rated side by side by people.

- `load()` / `prompts()`: the 200 prompts with their categories, shipped in the package
  (`imagen_jax/eval/data/drawbench.tsv`, from the paper's public list).
- `category_scores` / `format_scores`: the CLIP score per category for one or two models.
- `rating_items` + `write_rating_page`: a self-contained HTML page for human raters. Per
  prompt, model A's and model B's image side by side, in a random order drawn from a
  recorded seed; the rater picks left / right / tie for image fidelity ("Which image is more
  photorealistic?") and for image-text alignment ("Which image matches the caption
  better?"), as in the paper's two questions. Model names are not shown. The page keeps the
  choices in the browser's local storage and offers them as a JSON file to download.
- `tally(ratings)` / `format_tally`: maps each left / right choice back to A or B through the
  order recorded in that file and gives, per category and in total, the share of prompts on
  which raters preferred A, B, or neither.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import importlib.resources
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from etils import epath
from PIL import Image

from imagen_jax.errors import UserError

RATINGS_FORMAT = "imagen-jax drawbench ratings v1"
QUESTIONS = {"fidelity": "Which image is more photorealistic (looks more real)?",
             "alignment": "Which image matches the caption better?"}
CHOICES = ("left", "right", "tie")
ALL = "All"


class Prompt(NamedTuple):
  category: str
  prompt: str


@functools.lru_cache(maxsize=1)
def load() -> tuple[Prompt, ...]:
  """The 200 DrawBench prompts in the paper's order, with their categories."""
  text = importlib.resources.files("imagen_jax.eval").joinpath(
      "data/drawbench.tsv").read_text(encoding="utf-8")
  lines = text.splitlines()[1:]  # a header line: category<TAB>prompt
  return tuple(Prompt(*line.split("\t", 1)) for line in lines if line.strip())


def prompts() -> list[str]:
  return [p.prompt for p in load()]


def categories() -> list[str]:
  """The 11 categories, in order of first appearance."""
  return list(dict.fromkeys(p.category for p in load()))


@functools.lru_cache(maxsize=1)
def _categories_by_prompt() -> dict[str, str]:
  return {p.prompt: p.category for p in load()}


def category_of(prompt: str) -> str | None:
  """The DrawBench category of a prompt, or None for a prompt outside DrawBench."""
  return _categories_by_prompt().get(prompt.strip())


def category_scores(prompt_list: Sequence[str], scores: Sequence[float]
                    ) -> dict[str, dict[str, float]]:
  """{category: {"clip_score": mean, "n": images}} plus "All"; prompts outside DrawBench
  are not counted."""
  groups: dict[str, list[float]] = {}
  for prompt, score in zip(prompt_list, scores):
    category = category_of(prompt)
    if category is not None:
      groups.setdefault(category, []).append(float(score))
      groups.setdefault(ALL, []).append(float(score))
  order = [c for c in categories() + [ALL] if c in groups]
  return {c: {"clip_score": float(np.mean(groups[c])), "n": len(groups[c])} for c in order}


def format_scores(names: Sequence[str], tables: Sequence[Mapping[str, Mapping[str, float]]]
                  ) -> str:
  """A text table: one row per category, one CLIP-score column (and count) per model."""
  rows = [c for c in categories() + [ALL] if any(c in t for t in tables)]
  width = max(len(r) for r in rows + ["category"])
  header = f"{'category':<{width}}" + "".join(f"  {n[-24:]:>24} {'n':>4}" for n in names)
  lines = [header, "-" * len(header)]
  for row in rows:
    cells = "".join(f"  {t[row]['clip_score']:>24.2f} {t[row]['n']:>4}" if row in t
                    else f"  {'-':>24} {'-':>4}" for t in tables)
    lines.append(f"{row:<{width}}{cells}")
  return "\n".join(lines) + "\n"


def rating_items(prompt_list: Sequence[str], seed: int) -> list[dict[str, Any]]:
  """One item per prompt: id, prompt, category and which model is shown on the left."""
  rng = np.random.default_rng(seed)
  return [{"id": i, "prompt": p, "category": category_of(p) or "other",
           "left": "A" if rng.random() < 0.5 else "B"} for i, p in enumerate(prompt_list)]


def _png_data_uri(image: np.ndarray) -> str:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>DrawBench ratings</title>
<style>
body{{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}}
.item{{border-top:1px solid #ccc;padding:1em 0}} .prompt{{font-size:1.2em;margin:.5em 0}}
.pair{{display:flex;gap:1em}} .pair figure{{margin:0;text-align:center}}
.pair img{{width:400px;max-width:45vw;image-rendering:auto}}
fieldset{{border:none;padding:.2em 0}} .done{{background:#f2fff2}}
#bar{{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc}}
</style></head><body>
<div id="bar"><b>DrawBench</b>: for each caption, answer both questions, then
<button id="download">download ratings (JSON)</button> <span id="count"></span></div>
<p>The two images of each caption come from two different models, in random order. Choose
the better image for each question, or "tie" when neither is better. Choices are kept in
this browser until you download them.</p>
{items}
<script id="data" type="application/json">{data}</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const key = "drawbench:" + data.page_id;
const saved = JSON.parse(localStorage.getItem(key) || "{{}}");
function update() {{
  let done = 0;
  for (const item of data.items) {{
    const el = document.getElementById("item" + item.id);
    const complete = {questions}.every(q => saved[item.id + ":" + q]);
    el.classList.toggle("done", complete); done += complete;
  }}
  document.getElementById("count").textContent = done + " / " + data.items.length + " rated";
}}
document.querySelectorAll("input[type=radio]").forEach(input => {{
  const k = input.dataset.item + ":" + input.dataset.question;
  if (saved[k] === input.value) input.checked = true;
  input.addEventListener("change", () => {{
    saved[k] = input.value; localStorage.setItem(key, JSON.stringify(saved)); update();
  }});
}});
document.getElementById("download").addEventListener("click", () => {{
  const out = Object.assign({{}}, data);
  out.items = data.items.map(item => Object.assign({{}}, item,
      Object.fromEntries({questions}.map(q => [q, saved[item.id + ":" + q] || null]))));
  const blob = new Blob([JSON.stringify(out, null, 1)], {{type: "application/json"}});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "drawbench_ratings.json"; a.click();
}});
update();
</script></body></html>
"""


def _item_html(item: Mapping[str, Any], left: np.ndarray, right: np.ndarray) -> str:
  questions = "".join(
      f"<fieldset><legend>{html.escape(text)}</legend>" + "".join(
          f'<label><input type="radio" name="{item["id"]}:{q}" value="{c}" '
          f'data-item="{item["id"]}" data-question="{q}"> {c}</label> ' for c in CHOICES)
      + "</fieldset>" for q, text in QUESTIONS.items())
  return (f'<div class="item" id="item{item["id"]}">'
          f'<div class="prompt">{item["id"] + 1}. {html.escape(item["prompt"])}</div>'
          f'<div class="pair"><figure><img src="{_png_data_uri(left)}"><figcaption>left'
          f'</figcaption></figure><figure><img src="{_png_data_uri(right)}"><figcaption>'
          f'right</figcaption></figure></div>{questions}</div>\n')


def write_rating_page(path: str | os.PathLike, items: Sequence[Mapping[str, Any]],
                      images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray], *,
                      seed: int, models: Mapping[str, str]) -> str:
  """Writes the HTML page (atomically); image i of A and of B go with item i."""
  from imagen_jax.files import write_atomic
  if not (len(items) == len(images_a) == len(images_b)):
    raise ValueError("one image of A and one of B per item")
  body = "".join(
      _item_html(item, *((a, b) if item["left"] == "A" else (b, a)))
      for item, a, b in zip(items, images_a, images_b))
  # Names this page's saved choices in the browser; same page, same id.
  digest = hashlib.sha256(json.dumps([seed, list(items), dict(models)]).encode())
  page_id = digest.hexdigest()[:16]
  data = {"format": RATINGS_FORMAT, "seed": seed, "page_id": page_id,
          "models": dict(models), "questions": QUESTIONS, "items": list(items)}
  # "</" inside a <script> element would end it early.
  data_json = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
  page = _PAGE.format(items=body, data=data_json, questions=json.dumps(list(QUESTIONS)))
  write_atomic(epath.Path(path), page.encode("utf-8"))
  return os.fspath(path)


def read_ratings(path: str | os.PathLike) -> dict[str, Any]:
  from imagen_jax.weights import read_json
  ratings = read_json(path, "a DrawBench ratings file (downloaded from the rating page)")
  if not isinstance(ratings, dict) or ratings.get("format") != RATINGS_FORMAT:
    raise UserError(f"{os.fspath(path)} is not a DrawBench ratings file (no format "
                    f"{RATINGS_FORMAT!r}); download it with the page's button")
  return ratings


def tally(ratings: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
  """{question: {category: {"A", "B", "tie" (percent of rated prompts), "n"}}}, with "All".

  A left / right choice counts for the model that the item's recorded `left` put there.
  Items without a choice for a question are not counted for it.
  """
  out: dict[str, dict[str, dict[str, float]]] = {}
  for question in QUESTIONS:
    counts: dict[str, dict[str, int]] = {}
    for item in ratings.get("items", []):
      choice = item.get(question)
      if choice is None:
        continue
      if choice not in CHOICES or item.get("left") not in ("A", "B"):
        raise UserError(f"ratings item {item.get('id')} has {question}={choice!r} and "
                        f"left={item.get('left')!r}; expected one of {CHOICES} and A or B")
      other = "B" if item["left"] == "A" else "A"
      winner = {"left": item["left"], "right": other, "tie": "tie"}[choice]
      for category in (item.get("category", "other"), ALL):
        counts.setdefault(category, {"A": 0, "B": 0, "tie": 0})[winner] += 1
    order = [c for c in categories() + ["other", ALL] if c in counts]
    out[question] = {c: {**{k: 100.0 * v / sum(counts[c].values())
                            for k, v in counts[c].items()}, "n": sum(counts[c].values())}
                     for c in order}
  return out


def format_tally(result: Mapping[str, Mapping[str, Mapping[str, float]]],
                 models: Mapping[str, str]) -> str:
  lines = [f"A = {models.get('A', 'A')}", f"B = {models.get('B', 'B')}"]
  for question, table in result.items():
    lines += ["", f"{question}: {QUESTIONS[question]}",
              f"{'category':<20} {'A %':>6} {'B %':>6} {'tie %':>6} {'n':>4}"]
    lines += [f"{c:<20} {r['A']:>6.1f} {r['B']:>6.1f} {r['tie']:>6.1f} {r['n']:>4}"
              for c, r in table.items()]
    if not table:
      lines.append("(no choices)")
  return "\n".join(lines) + "\n"


# --- Directories written by imagen-sample -------------------------------------------------


def score_dir(samples_dir: str | os.PathLike, scorer, stage: int | None = None
              ) -> dict[str, Any]:
  """CLIP scores of the DrawBench images in an imagen-sample directory, per category.

  Returns {"stage", "categories": category_scores, "num_images", "num_skipped" (rows
  whose prompt is not a DrawBench prompt), "first": {prompt: image row of the lowest
  sample}}. `scorer` is an `imagen_jax.eval.clip_score.ClipScorer`.
  """
  from imagen_jax.eval import samples as samples_lib
  stage, rows = samples_lib.stage_rows(samples_dir, stage)
  kept = [row for row in rows if category_of(row["prompt"]) is not None]
  if not kept:
    raise UserError(f"{os.fspath(samples_dir)!r} has no image of a DrawBench prompt; sample "
                    "them with imagen-sample --prompts=drawbench")
  images = [samples_lib.load_image(samples_dir, row) for row in kept]
  scores = scorer.pair_scores(images, [row["prompt"] for row in kept])
  first: dict[str, dict[str, Any]] = {}
  for row in kept:  # rows are sorted by (prompt_index, sample)
    first.setdefault(row["prompt"].strip(), row)
  return {"stage": stage, "categories": category_scores([r["prompt"] for r in kept], scores),
          "num_images": len(kept), "num_skipped": len(rows) - len(kept), "first": first}


def write_comparison_page(path: str | os.PathLike, dir_a: str | os.PathLike,
                          first_a: Mapping[str, Any], dir_b: str | os.PathLike,
                          first_b: Mapping[str, Any], *, seed: int) -> int:
  """The rating page for the prompts that both directories sampled (their first sample
  each, in DrawBench order); returns the number of items."""
  from imagen_jax.eval import samples as samples_lib
  common = [p for p in prompts() if p in first_a and p in first_b]
  if not common:
    raise UserError(f"{os.fspath(dir_a)!r} and {os.fspath(dir_b)!r} share no DrawBench "
                    "prompt; sample both with imagen-sample --prompts=drawbench")
  items = rating_items(common, seed)
  write_rating_page(path, items, [samples_lib.load_image(dir_a, first_a[p]) for p in common],
                    [samples_lib.load_image(dir_b, first_b[p]) for p in common], seed=seed,
                    models={"A": os.fspath(dir_a), "B": os.fspath(dir_b)})
  return len(items)
