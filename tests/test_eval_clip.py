"""imagen-eval clip_score / drawbench, DrawBench's packaged prompts, the rating page and
the tally of its ratings."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from imagen_jax.cli import eval as eval_cli
from imagen_jax.data.clip_preprocess import ClipImageProcessor
from imagen_jax.errors import UserError
from imagen_jax.eval import drawbench
from imagen_jax.nn import clip
from imagen_jax.sample import output
from imagen_jax.text import clip_tokenizer as ct

PAPER_SIZES = {"Colors": 25, "Conflicting": 10, "Counting": 19, "DALL-E": 20,
               "Descriptions": 20, "Gary Marcus et al.": 10, "Misspellings": 10,
               "Positional": 20, "Rare Words": 7, "Reddit": 38, "Text": 21}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("clip")
  merges = ct.learn_merges(drawbench.prompts(), 40)
  vocab = ct.byte_level_vocab(merges)
  config = clip.CLIPConfig(
      text=clip.CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2,
                               bos_token_id=vocab[ct.BOS], eos_token_id=vocab[ct.EOS]),
      vision=clip.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, image_size=16, patch_size=8),
      projection_dim=8)
  clip.save_clip(path, clip.random_clip(config, seed=0, spread=0.1))
  ct.save_tokenizer(path, vocab, merges)
  ClipImageProcessor(shortest_edge=16, crop_size=16).save(path)
  return path


def write_samples(directory, prompts, seed, samples=1, stages=(0, 1)):
  """An imagen-sample output: index.jsonl plus random PNGs for every stage."""
  rng = np.random.default_rng(seed)
  writer = output.IndexWriter(directory)
  rows = []
  for stage in stages:
    for p, prompt in enumerate(prompts):
      for s in range(samples):
        file = output.image_file(stage, p, s)
        output.write_png(directory / file, rng.integers(0, 256, (8 * (stage + 1),) * 2 + (3,),
                                                        dtype=np.uint8))
        rows.append({"prompt": prompt, "prompt_index": p, "sample": s, "stage": stage,
                     "seed": seed, "file": file, "sampler": {}})
  writer.add(rows)
  return directory


def test_drawbench_ships_the_papers_200_prompts_in_11_categories():
  prompts = drawbench.load()
  assert len(prompts) == 200 and len({p.prompt for p in prompts}) == 200
  sizes = {c: sum(p.category == c for p in prompts) for c in drawbench.categories()}
  assert sizes == PAPER_SIZES
  from imagen_jax.cli import sample as sample_cli
  assert sample_cli.read_prompts_arg("drawbench") == [p.prompt for p in prompts]
  assert drawbench.category_of("A red colored car.") == "Colors"


def test_clip_score_command_json_and_stage(tmp_path, clip_dir, capsys):
  samples = write_samples(tmp_path / "s", ["a red car", "a dog", "a red car"], seed=0,
                          samples=2)
  assert eval_cli.main(["clip_score", f"--samples={samples}", f"--clip={clip_dir}",
                        "--json", "--no_progress"]) == 0
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last["num_images"] == 6 and last["stage"] == 1 and 0 <= last["clip_score"] <= 100
  written = json.loads((samples / "clip_score.json").read_text())
  scores = [row["clip_score"] for row in written["images"]]
  assert last["clip_score"] == pytest.approx(np.mean(scores), abs=1e-5)
  # Rows 0 and 2 share a prompt but not an image: the scores are per image.
  assert len(set(np.round(scores, 6))) > 1
  assert eval_cli.main(["clip_score", f"--samples={samples}", f"--clip={clip_dir}",
                        "--stage=0", "--json", "--no_progress"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stage"] == 0


def test_cli_errors_are_one_line_and_exit_2(tmp_path, clip_dir):
  samples = write_samples(tmp_path / "s", ["a dog"], seed=0, stages=(0,))
  no_tokenizer = tmp_path / "clip_without_tokenizer"
  no_tokenizer.mkdir()
  for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
    (no_tokenizer / name).write_bytes((clip_dir / name).read_bytes())
  (tmp_path / "empty").mkdir()
  cases = [
      (["clip_score", f"--samples={samples}", f"--clip={no_tokenizer}"], "no CLIP tokenizer"),
      (["clip_score", f"--samples={tmp_path / 'empty'}", f"--clip={clip_dir}"],
       "index.jsonl"),
      (["clip_score", f"--samples={samples}", f"--clip={clip_dir}", "--stage=3"],
       "--stage=3"),
      (["drawbench", f"--samples={samples}", f"--clip={clip_dir}"], "no image of a DrawBench"),
  ]
  for args, message in cases[:1]:  # one through a real process: exit status and stderr
    done = subprocess.run([sys.executable, "-m", "imagen_jax.cli.eval", *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr
  for args, message in cases[1:]:
    with pytest.raises(UserError, match=re.escape(message)):
      eval_cli._main(args)
    assert eval_cli.main(args) == 2


def test_rating_page_has_every_item_and_tally_maps_sides_back(tmp_path):
  prompts = drawbench.prompts()[:6] + drawbench.prompts()[-3:]
  items = drawbench.rating_items(prompts, seed=3)
  assert items == drawbench.rating_items(prompts, seed=3)  # recorded and reproducible
  assert {i["left"] for i in items} == {"A", "B"}
  rng = np.random.default_rng(0)
  a = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in prompts]
  b = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in prompts]
  page = drawbench.write_rating_page(tmp_path / "page.html", items, a, b, seed=3,
                                     models={"A": "runs/a", "B": "runs/b"})
  text = open(page, encoding="utf-8").read()
  assert text.count('<div class="item"') == len(prompts)
  assert text.count("data:image/png;base64,") == 2 * len(prompts)
  assert "runs/a" not in text.split('<script id="data"')[0]  # names hidden from raters
  data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>',
                              text, re.S).group(1))
  assert data["items"] == items and data["seed"] == 3
  # The left image of item 0 is A's image when its recorded left is A.
  first = text.split('<div class="item" id="item0">')[1]
  left_src = re.search(r'<img src="([^"]+)"', first).group(1)
  assert left_src == drawbench._png_data_uri(a[0] if items[0]["left"] == "A" else b[0])
  # A rater who always picks the left image for fidelity, and ties on alignment.
  ratings = dict(data, items=[dict(i, fidelity="left", alignment="tie") for i in items])
  result = drawbench.tally(ratings)
  share_a = 100 * sum(i["left"] == "A" for i in items) / len(items)
  assert result["fidelity"]["All"]["A"] == pytest.approx(share_a)
  assert result["fidelity"]["All"]["B"] == pytest.approx(100 - share_a)
  assert result["alignment"]["All"] == {"A": 0.0, "B": 0.0, "tie": 100.0, "n": len(items)}
  assert result["fidelity"]["Colors"]["n"] == 6 and result["fidelity"]["Text"]["n"] == 3
  # "right" maps to the other model.
  flipped = drawbench.tally(dict(data, items=[dict(i, fidelity="right") for i in items]))
  assert flipped["fidelity"]["All"]["A"] == pytest.approx(100 - share_a)
  with pytest.raises(UserError, match="fidelity='up'"):
    drawbench.tally(dict(data, items=[dict(items[0], fidelity="up")]))


def test_drawbench_command_scores_by_category_writes_page_and_tallies(tmp_path, clip_dir,
                                                                      capsys):
  prompts = drawbench.prompts()[:3] + drawbench.prompts()[100:102] + ["not drawbench"]
  a = write_samples(tmp_path / "a", prompts, seed=1, stages=(0,))
  b = write_samples(tmp_path / "b", prompts[1:], seed=2, stages=(0,))
  page = tmp_path / "rate.html"
  assert eval_cli.main(["drawbench", f"--samples={a}", f"--versus={b}", f"--clip={clip_dir}",
                        f"--out={page}", "--seed=5", "--json", "--no_progress"]) == 0
  out = capsys.readouterr().out
  summary = json.loads(out.strip().splitlines()[-1])
  table_a = summary["clip_score"][str(a)]
  assert table_a["All"]["n"] == 5 and table_a["Colors"]["n"] == 3
  assert summary["clip_score"][str(b)]["All"]["n"] == 4
  assert "Colors" in out and "All" in out
  text = page.read_text(encoding="utf-8")
  assert text.count('<div class="item"') == 4  # the DrawBench prompts both sampled
  data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>',
                              text, re.S).group(1))
  ratings = dict(data, items=[dict(i, fidelity="left", alignment=None)
                              for i in data["items"]])
  (tmp_path / "ratings.json").write_text(json.dumps(ratings))
  assert eval_cli.main(["drawbench", f"--ratings={tmp_path / 'ratings.json'}", "--json"]) == 0
  tally = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  share_a = 100 * sum(i["left"] == "A" for i in data["items"]) / 4
  assert tally["fidelity"]["All"]["A"] == pytest.approx(share_a)
  assert tally["alignment"] == {}
  (tmp_path / "bad.json").write_text("{}")
  assert eval_cli.main(["drawbench", f"--ratings={tmp_path / 'bad.json'}"]) == 2


# A minimal DOM for the page's script: radios from the HTML, local storage, and a download
# that prints the file. Clicking "left" for fidelity on every item, then downloading.
_DOM_STUB = r"""
const fs = require("fs");
const html = fs.readFileSync(process.argv[2], "utf8");
const dataText = html.match(/<script id="data" type="application\/json">([\s\S]*?)<\/script>/)[1];
const script = html.match(/<script>([\s\S]*?)<\/script>/)[1];
const inputs = [...html.matchAll(/<input type="radio" name="[^"]+" value="(\w+)" data-item="(\d+)" data-question="(\w+)">/g)]
  .map(m => ({value: m[1], dataset: {item: m[2], question: m[3]}, handlers: [],
              addEventListener(e, f) { this.handlers.push(f); }}));
let download = null, blobText = null;
const el = id => id === "data" ? {textContent: dataText}
  : id === "download" ? {addEventListener: (e, f) => { download = f; }}
  : {classList: {toggle() {}}, textContent: ""};
global.document = {getElementById: el, querySelectorAll: () => inputs,
                   createElement: () => ({click() { process.stdout.write(blobText); }})};
const store = {};
global.localStorage = {getItem: k => store[k] ?? null, setItem: (k, v) => { store[k] = v; }};
global.Blob = function (parts) { blobText = parts.join(""); };
global.URL = {createObjectURL: () => "blob:"};
eval(script);
for (const input of inputs)
  if (input.dataset.question === "fidelity" && input.value === "left")
    input.handlers.forEach(f => f());
download();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_rating_page_script_downloads_choices_that_tally(tmp_path):
  prompts = drawbench.prompts()[:5]
  items = drawbench.rating_items(prompts, seed=1)
  image = np.zeros((4, 4, 3), np.uint8)
  page = drawbench.write_rating_page(tmp_path / "p.html", items, [image] * 5, [image] * 5,
                                     seed=1, models={"A": "a", "B": "b"})
  (tmp_path / "stub.js").write_text(_DOM_STUB)
  done = subprocess.run(["node", str(tmp_path / "stub.js"), page], capture_output=True,
                        text=True, timeout=60, check=True)
  ratings = json.loads(done.stdout)
  assert [i["fidelity"] for i in ratings["items"]] == ["left"] * 5
  assert [i["alignment"] for i in ratings["items"]] == [None] * 5
  (tmp_path / "r.json").write_text(done.stdout)
  result = drawbench.tally(drawbench.read_ratings(tmp_path / "r.json"))
  assert result["fidelity"]["All"]["A"] == pytest.approx(
      100 * sum(i["left"] == "A" for i in items) / 5)
