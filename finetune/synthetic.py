"""A small procedural M-BEIR-format benchmark: rendered shapes, captions, passages and composed edits.

Every M-BEIR task type is covered, on the dataset ids whose instructions fit it best:

====  =================  ============================================================================
task  dataset            query -> positive
====  =================  ============================================================================
0     MSCOCO (9)         caption "a small red solid circle in the top left corner" -> its image
1     WebQA (2)          question about a named shape -> the passage that answers it
2     WebQA (2)          "the red circle Ada sketched in 1961" -> (image, "Sketched by Ada in 1961.")
3     MSCOCO (9)         image -> its caption (these captions are also what t->i queries say)
4     NIGHTS (4)         image -> same shape, colour and fill at another size or position
6     InfoSeek (6)       (image, question) -> the passage about that shape answering the question
7     CIRR (8)           (image, "the same shape in blue") -> the edited image
8     InfoSeek (6)       (image, question) -> (another rendering, passage)
====  =================  ============================================================================

Each attribute combination (8 shapes x 10 colours x 3 sizes x 9 positions x 2 fills) appears at most
once per task and split, so a query has exactly one right answer in its local pool; ``distractors``
adds candidates no query asks for. The global pool of a split is the union of its local pools: it
holds text, image and image+text candidates, and every t->i query's caption is in it as a TEXT
candidate, which is where modality bias shows. A separate text-to-text set (question -> passages,
with hard negatives) has a text-only pool for nDCG@10. ``manifest.json`` lists every file.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mmembed_rag.instructions import M_BEIR_DATASETS, M_BEIR_TASKS

from .data import MBEIRDataset, TextRetrievalData, read_jsonl, task_key, write_jsonl_atomic

__all__ = ["generate_benchmark", "load_benchmark", "load_text_benchmark", "Shape", "caption", "render"]

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "pentagon", "hexagon")
COLOURS = {"red": (215, 35, 35), "green": (35, 150, 60), "blue": (40, 70, 215), "yellow": (230, 195, 25),
           "purple": (125, 50, 165), "orange": (240, 125, 20), "black": (25, 25, 25), "gray": (125, 125, 125),
           "pink": (235, 115, 170), "brown": (115, 70, 30)}
SIZES = {"small": 0.11, "medium": 0.16, "large": 0.22}
POSITIONS = {"top left": (0.28, 0.28, "in the top left corner"), "top": (0.5, 0.28, "at the top"),
             "top right": (0.72, 0.28, "in the top right corner"), "left": (0.28, 0.5, "on the left"),
             "center": (0.5, 0.5, "in the center"), "right": (0.72, 0.5, "on the right"),
             "bottom left": (0.28, 0.72, "in the bottom left corner"), "bottom": (0.5, 0.72, "at the bottom"),
             "bottom right": (0.72, 0.72, "in the bottom right corner")}
FILLS = ("solid", "outlined")
CORNERS = {"circle": 0, "square": 4, "triangle": 3, "star": 10, "cross": 12, "diamond": 4, "pentagon": 5,
           "hexagon": 6}
MAKERS = ("Ada", "Bruno", "Chen", "Dalia", "Emil", "Farah", "Goran", "Hana")
_SYLLABLES = ("ka", "lo", "mi", "ze", "ru", "ta", "no", "vi", "sa", "pe", "du", "ri", "mo", "fa")
# task id -> M-BEIR dataset id whose catalog instructions fit the synthetic task.
TASK_DATASETS = {0: 9, 1: 2, 2: 2, 3: 9, 4: 4, 6: 6, 7: 8, 8: 6}
INSTRUCTIONS = {
    0: ("Find the picture that matches the shape description.", "Show me the image this caption describes.",
        "Retrieve the drawing of the described shape."),
    1: ("Retrieve the passage that answers the question about the shape.",
        "Find a paragraph that answers this question.", "Which passage answers this question?"),
    2: ("Find the picture and note that answer the request.", "Retrieve the sketch with its note for this request.",
        "Show me the captioned drawing that is asked for."),
    3: ("Find a caption describing the shape in this picture.", "Retrieve the description of this drawing.",
        "Which caption matches the shown image?"),
    4: ("Find another drawing of the same shape with the same colour and fill.",
        "Retrieve a picture of this shape, possibly moved or resized.", "Which image shows the same shape?"),
    6: ("Retrieve the passage that answers the question about the shape in the image.",
        "Find a paragraph answering my question about this picture.", "Which passage answers the question?"),
    7: ("Find the picture obtained by applying the edit to the reference image.",
        "Retrieve the modified drawing described by the change.", "Show me this image after the change."),
    8: ("Retrieve the picture and passage that answer the question about the image.",
        "Find the illustrated paragraph answering my question about this picture.",
        "Which image with text answers the question?"),
}
_QUESTIONS = {"history": "When was this shape first sketched, and by whom?",
              "geometry": "How many corners does this shape have?"}


@dataclass(frozen=True)
class Shape:
    """One drawable combination of attributes."""

    shape: str
    colour: str
    size: str
    position: str
    fill: str

    @property
    def noun(self) -> str:
        return f"{self.size} {self.fill} {self.colour} {self.shape}"

    @property
    def where(self) -> str:
        return POSITIONS[self.position][2]


ALL_SHAPES = tuple(Shape(*combo) for combo in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, FILLS))


def caption(shape: Shape, rng: random.Random) -> str:
    """A caption naming all five attributes, in one of a few phrasings."""
    s, article = shape, "an" if shape.fill == "outlined" else "a"
    return rng.choice((f"a {s.noun} {s.where}", f"{s.where}, a {s.size} {s.colour} {s.shape}, {s.fill}",
                       f"{article} {s.fill} {s.shape} in {s.colour}, {s.size}, {s.where}"))


def render(shape: Shape, rng: random.Random, image_size: int = 64) -> Image.Image:
    """Draw ``shape`` on a light, slightly tinted background with jittered position, size, rotation and colour."""
    img = Image.new("RGB", (image_size,) * 2, tuple(rng.randint(215, 255) for _ in range(3)))
    cx, cy, _ = POSITIONS[shape.position]
    cx, cy = ((c + rng.uniform(-0.035, 0.035)) * image_size for c in (cx, cy))
    r = SIZES[shape.size] * image_size * rng.uniform(0.9, 1.1)
    colour = tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in COLOURS[shape.colour])
    fill, width = (colour, 1) if shape.fill == "solid" else (None, max(2, round(r / 4)))
    draw = ImageDraw.Draw(img)
    if shape.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=colour, width=width)
        return img
    turn = math.radians(rng.uniform(-8, 8))
    if shape.shape == "star":
        radii, start = [r if i % 2 == 0 else 0.45 * r for i in range(10)], -90
    elif shape.shape == "cross":
        a, b = 0.35 * r, r  # 12 corners of a plus sign, as (radius, angle) pairs
        corners = [(a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b), (-a, -b), (-a, -a), (-b, -a), (-b, a),
                   (-a, a), (-a, b)]
        radii, start = None, 0
    else:
        k, start = {"square": (4, 45), "triangle": (3, -90), "diamond": (4, 0), "pentagon": (5, -90),
                    "hexagon": (6, 0)}[shape.shape]
        radii = [r] * k
    if radii is not None:
        step = 2 * math.pi / len(radii)
        squash = 0.65 if shape.shape == "diamond" else 1.0
        corners = [(rad * math.cos(math.radians(start) + i * step) * squash,
                    rad * math.sin(math.radians(start) + i * step)) for i, rad in enumerate(radii)]
    points = [(cx + x * math.cos(turn) - y * math.sin(turn), cy + x * math.sin(turn) + y * math.cos(turn))
              for x, y in corners]
    draw.polygon(points, fill=fill, outline=colour, width=width)
    return img


@dataclass(frozen=True)
class _Entity:
    shape: Shape
    name: str
    maker: str
    year: int

    def passage(self, kind: str) -> str:
        s = self.shape
        if kind == "history":
            return (f"{self.name} is the {s.noun} {s.where}. It was first sketched in {self.year} by "
                    f"{self.maker}, who kept it in a notebook of {s.colour} drawings.")
        corners = f"{CORNERS[s.shape]} corners" if CORNERS[s.shape] else "no corners at all"
        return (f"{self.name} is a {s.colour} {s.shape} with {corners}. Drawn {s.fill}, it covers a {s.size} "
                f"part of the frame {s.where}.")

    def question(self, kind: str) -> str:
        if kind == "history":
            return f"When was the {self.shape.noun} {self.shape.where} first sketched, and by whom?"
        return f"How many corners does {self.name}, the {self.shape.colour} {self.shape.shape}, have?"


class _Split:
    """Writes the images and records of one split, handing out ids and unused attribute combinations."""

    def __init__(self, root: Path, split: str, seed: int, image_size: int, saver: ThreadPoolExecutor) -> None:
        self.root, self.split, self.seed, self.image_size, self.saver = root, split, seed, image_size, saver
        self.pending: list[Future] = []
        self.counters: dict[tuple[str, int], int] = {}
        self.images = 0

    def rng(self, task_id: int) -> random.Random:
        return random.Random(f"synthetic:{self.seed}:{self.split}:{task_id}")

    def _next(self, kind: str, dataset_id: int) -> str:
        n = self.counters[(kind, dataset_id)] = self.counters.get((kind, dataset_id), 0) + 1
        return f"{dataset_id}:{n}"

    def image(self, shape: Shape, rng: random.Random, task_id: int) -> str:
        self.images += 1
        rel = f"images/{self.split}/task{task_id}/{self.images:06d}.png"
        image = render(shape, rng, self.image_size)  # drawn here, in order, so the RNG stream is fixed
        self.pending.append(self.saver.submit(image.save, self.root / rel, format="PNG", compress_level=1))
        return rel

    def candidate(self, dataset_id: int, shape: Shape, txt: str | None = None, img: str | None = None,
                  **src: Any) -> dict:
        modality = ",".join(m for m, v in (("image", img), ("text", txt)) if v)
        return {"did": self._next("c", dataset_id), "txt": txt, "img_path": img, "modality": modality,
                "src_content": json.dumps({**vars(shape), **src}, sort_keys=True)}

    def query(self, task_id: int, positive: dict, shape: Shape, txt: str | None = None, img: str | None = None,
              **src: Any) -> dict:
        """A query record; ``src`` (with the shape's attributes) goes to ``query_src_content``."""
        dataset_id = TASK_DATASETS[task_id]
        return {"qid": self._next("q", dataset_id), "query_txt": txt, "query_img_path": img,
                "query_modality": M_BEIR_TASKS[task_id][0],
                "query_src_content": json.dumps({**vars(shape), **src}, sort_keys=True),
                "pos_cand_list": [positive["did"]], "neg_cand_list": [], "task_id": task_id}


def _combos(rng: random.Random, k: int) -> list[Shape]:
    if k > len(ALL_SHAPES):
        raise ValueError(f"asked for {k} distinct shapes; there are {len(ALL_SHAPES)} attribute combinations")
    return rng.sample(ALL_SHAPES, k)


def _entities(rng: random.Random, k: int) -> list[_Entity]:
    names: set[str] = set()
    syllables = 3 if 2 * k <= len(_SYLLABLES) ** 3 else 4  # leave room so the draw below ends quickly
    while len(names) < k:
        names.add("".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize())
    return [_Entity(shape, name, rng.choice(MAKERS), rng.randint(1950, 1999))
            for shape, name in zip(_combos(rng, k), sorted(names), strict=True)]


Built = dict[int, tuple[list[dict], list[dict]]]  # task id -> (queries, local pool)


def _mscoco(w: _Split, n: int, extra: int) -> Built:
    rng = w.rng(0)
    items = [(s, w.candidate(9, s, img=w.image(s, rng, 0)), w.candidate(9, s, txt=caption(s, rng)))
             for s in _combos(rng, n + extra)]
    t2i = [w.query(0, img, s, txt=cap["txt"]) for s, img, cap in items[:n]]
    i2t = [w.query(3, cap, s, img=w.image(s, rng, 3)) for s, _, cap in items[:n]]
    return {0: (t2i, [img for _, img, _ in items]), 3: (i2t, [cap for _, _, cap in items])}


def _webqa(w: _Split, n: int, extra: int) -> Built:
    rng, kinds = w.rng(1), ("history", "geometry")
    passages = [(e, {k: w.candidate(2, e.shape, txt=e.passage(k), name=e.name, kind=k) for k in kinds})
                for e in _entities(rng, n + extra)]
    t2t = []
    for e, cands in passages[:n]:
        kind = rng.choice(kinds)
        t2t.append(w.query(1, cands[kind], e.shape, txt=e.question(kind), name=e.name, kind=kind))
    rng = w.rng(2)
    pictures = [(e, w.candidate(2, e.shape, txt=f"Sketched by {e.maker} in {e.year}.", img=w.image(e.shape, rng, 2),
                                name=e.name))
                for e in _entities(rng, n + extra)]
    t2it = [w.query(2, c, e.shape, txt=f"Show me the {e.shape.colour} {e.shape.shape} {e.maker} sketched in {e.year}.",
                    name=e.name)
            for e, c in pictures[:n]]
    return {1: (t2t, [c for _, pair in passages for c in pair.values()]), 2: (t2it, [c for _, c in pictures])}


def _nights(w: _Split, n: int, extra: int) -> Built:
    rng = w.rng(4)
    kinds = sorted({(s.shape, s.colour, s.fill) for s in ALL_SHAPES})  # one image per kind keeps answers unique
    queries, pool = [], []
    for i, (shape, colour, fill) in enumerate(rng.sample(kinds, min(n + extra, len(kinds)))):
        a = Shape(shape, colour, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)), fill)
        b = a
        while b == a:
            b = replace(a, size=rng.choice(list(SIZES)), position=rng.choice(list(POSITIONS)))
        pool.append(w.candidate(4, b, img=w.image(b, rng, 4)))
        if i < n:
            queries.append(w.query(4, pool[-1], a, img=w.image(a, rng, 4)))
    return {4: (queries, pool)}


def _infoseek(w: _Split, n: int, extra: int) -> Built:
    out: Built = {}
    for task_id in (6, 8):
        rng, queries, pool = w.rng(task_id), [], []
        for i, e in enumerate(_entities(rng, n + extra)):
            picture = w.image(e.shape, rng, task_id) if task_id == 8 else None
            cands = {k: w.candidate(6, e.shape, txt=e.passage(k), img=picture, name=e.name, kind=k) for k in _QUESTIONS}
            pool.extend(cands.values())
            if i < n:
                kind = rng.choice(list(_QUESTIONS))
                queries.append(w.query(task_id, cands[kind], e.shape, txt=_QUESTIONS[kind],
                                       img=w.image(e.shape, rng, task_id), name=e.name, kind=kind))
        out[task_id] = (queries, pool)
    return out


def _edit(shape: Shape, rng: random.Random) -> tuple[Shape, str]:
    """Change one attribute of ``shape``; returns the target and the edit text (possibly a no-op)."""
    attribute = rng.choice(("colour", "shape", "size", "position", "fill"))
    if attribute == "colour":
        target = replace(shape, colour=rng.choice(list(COLOURS)))
        return target, f"the same shape in {target.colour}"
    if attribute == "shape":
        target = replace(shape, shape=rng.choice(SHAPES))
        return target, f"make it a {target.shape}, keep the rest"
    if attribute == "size":
        target = replace(shape, size=rng.choice(list(SIZES)))
        return target, f"make it {target.size}"
    if attribute == "position":
        target = replace(shape, position=rng.choice(list(POSITIONS)))
        return target, f"move it {target.where}"
    target = replace(shape, fill=rng.choice(FILLS))
    return target, f"make it {target.fill} instead"


def _cirr(w: _Split, n: int, extra: int) -> Built:
    rng, used, queries, pool = w.rng(7), set(), [], []
    order = _combos(rng, len(ALL_SHAPES))
    for ref in order:
        if len(queries) >= n:
            break
        target, edit = _edit(ref, rng)
        if target == ref or {ref, target} & used:
            continue
        used |= {ref, target}
        pool.append(w.candidate(8, ref, img=w.image(ref, rng, 7)))  # the unedited look: a hard negative
        pool.append(w.candidate(8, target, img=w.image(target, rng, 7)))
        queries.append(w.query(7, pool[-1], ref, txt=edit, img=w.image(ref, rng, 7)))
    for s in order:
        if len(pool) >= 2 * len(queries) + extra:
            break
        if s not in used:
            used.add(s)
            pool.append(w.candidate(8, s, img=w.image(s, rng, 7)))
    return {7: (queries, pool)}


def _text_set(rng: random.Random, n: int, extra: int, split: str) -> tuple[list[dict], list[dict]]:
    entities, kinds = _entities(rng, n + extra), ("history", "geometry")
    corpus = [{"did": f"{split}:{i * 2 + j}", "txt": e.passage(k), "modality": "text"}
              for i, e in enumerate(entities) for j, k in enumerate(kinds)]
    groups: dict[str, list[_Entity]] = {}
    for e in entities:
        groups.setdefault(e.shape.shape, []).append(e)
        groups.setdefault(e.shape.colour, []).append(e)
    queries = []
    for i, e in enumerate(entities[:n]):
        kind = rng.choice(kinds + ("both",))
        text = f"Tell me about {e.name}." if kind == "both" else e.question(kind)
        positives = [e.passage(k) for k in kinds if kind in (k, "both")]
        # Hard negatives: passages about other shapes of the same kind or colour.
        similar = [o for o in dict.fromkeys(groups[e.shape.shape] + groups[e.shape.colour]) if o is not e]
        negatives = [o.passage(rng.choice(kinds)) for o in rng.sample(similar, min(3, len(similar)))]
        queries.append({"qid": f"text-{split}:{i}", "query": text, "positives": positives, "negatives": negatives})
    return queries, corpus


def generate_benchmark(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 200, n_test: int = 50,
                       image_size: int = 64, distractors: float = 1.0, n_text_train: int | None = None,
                       n_text_test: int | None = None, n_val: int = 50, n_text_val: int | None = None
                       ) -> dict[str, Any]:
    """Write the benchmark under ``out_dir`` and return its manifest (also written as ``manifest.json``).

    Args:
        out_dir: target directory (created; existing files of the same names are overwritten).
        seed: every image, caption and id is a function of the seed and the sizes.
        n_train, n_test: queries per task and split (task 4 is capped at 160, the number of
            shape x colour x fill kinds; its distractors too).
        n_val: queries per task of the validation split (tune on it, report on test; 0: no such split).
            Each split draws from its own random stream, so adding it leaves train and test unchanged.
        image_size: side of the square images in pixels.
        distractors: extra candidates per local pool, as a multiple of the number of queries.
        n_text_train, n_text_test, n_text_val: queries of the text-to-text set (default ``n_train`` /
            ``n_test`` / ``n_val``).

    Returns:
        The manifest: per task and split the queries, local pool and qrels files and counts; per split the
        union queries, global pool and qrels; the instructions tsv; the text set's files.
    """
    root = Path(out_dir)
    manifest: dict[str, Any] = {"format": "m-beir", "seed": seed, "image_size": image_size, "image_root": ".",
                                "instructions": "instructions/query_instructions.tsv", "tasks": {}, "splits": {}}
    (root / "instructions").mkdir(parents=True, exist_ok=True)
    rows = ["dataset\tdataset_id\tquery_modality\tcand_modality\t" + "\t".join(f"prompt_{i}" for i in (1, 2, 3))]
    rows += [f"{M_BEIR_DATASETS[TASK_DATASETS[t]]}\t{TASK_DATASETS[t]}\t" + "\t".join(M_BEIR_TASKS[t]) + "\t"
             + "\t".join(prompts) for t, prompts in INSTRUCTIONS.items()]
    (root / manifest["instructions"]).write_text("\n".join(rows) + "\n", encoding="utf-8")
    sizes = {"train": (n_train, n_text_train), "val": (n_val, n_text_val), "test": (n_test, n_text_test)}
    for split, (n, n_text) in sizes.items():
        if n == 0:
            continue
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as saver:  # PNG encoding drops the GIL
            writer, extra = _Split(root, split, seed, image_size, saver), round(distractors * n)
            for task_id in TASK_DATASETS:
                (root / f"images/{split}/task{task_id}").mkdir(parents=True, exist_ok=True)
            built: Built = {}
            for make in (_mscoco, _webqa, _nights, _infoseek, _cirr):
                built.update(make(writer, n, extra))
            for future in writer.pending:
                future.result()  # re-raise a failed save here
        union_queries, union_pool, union_qrels = [], {}, []
        for task_id, (queries, pool) in sorted(built.items()):
            name = M_BEIR_DATASETS[TASK_DATASETS[task_id]].lower()
            files = {"queries": f"query/{split}/mbeir_{name}_task{task_id}_{split}.jsonl",
                     "pool": f"cand_pool/local/mbeir_{name}_task{task_id}_{split}_cand_pool.jsonl",
                     "qrels": f"qrels/{split}/mbeir_{name}_task{task_id}_{split}_qrels.txt"}
            qrels = [f"{q['qid']} 0 {did} 1 {task_id}" for q in queries for did in q["pos_cand_list"]]
            write_jsonl_atomic(root / files["queries"], queries)
            write_jsonl_atomic(root / files["pool"], pool)
            _write_lines(root / files["qrels"], qrels)
            union_queries += queries
            union_pool.update((c["did"], c) for c in pool)
            union_qrels += qrels
            key = task_key(TASK_DATASETS[task_id], task_id)
            manifest["tasks"].setdefault(key, {"dataset_id": TASK_DATASETS[task_id], "task_id": task_id,
                                               "modalities": list(M_BEIR_TASKS[task_id])})[split] = {
                **files, "n_queries": len(queries), "n_candidates": len(pool)}
        files = {"queries": f"query/{split}/mbeir_union_{split}.jsonl",
                 "global_pool": f"cand_pool/global/mbeir_union_{split}_cand_pool.jsonl",
                 "qrels": f"qrels/{split}/mbeir_union_{split}_qrels.txt"}
        write_jsonl_atomic(root / files["queries"], union_queries)
        write_jsonl_atomic(root / files["global_pool"], union_pool.values())
        _write_lines(root / files["qrels"], union_qrels)
        manifest["splits"][split] = {**files, "n_queries": len(union_queries), "n_candidates": len(union_pool)}
        n_text = n_text or n
        text_queries, corpus = _text_set(random.Random(f"synthetic:{seed}:{split}:text"), n_text, extra, split)
        write_jsonl_atomic(root / f"text/{split}.jsonl", text_queries)
        write_jsonl_atomic(root / f"text/corpus_{split}.jsonl", corpus)
        manifest.setdefault("text", {})[split] = {"queries": f"text/{split}.jsonl", "n_queries": len(text_queries),
                                                  "corpus": f"text/corpus_{split}.jsonl", "n_passages": len(corpus)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("synthetic benchmark written to %s: %s queries", root,
                {split: files["n_queries"] for split, files in manifest["splits"].items()})
    return manifest


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def load_benchmark(root: str | os.PathLike, split: str = "train", *, check_images: bool = True) -> MBEIRDataset:
    """Load one split of a generated benchmark: union queries, global pool, local pools, qrels, instructions."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    files = manifest["splits"][split]
    return MBEIRDataset.load(root / files["queries"], root / files["global_pool"],
                             instructions=root / manifest["instructions"], qrels=root / files["qrels"],
                             local_pools={key: root / task[split]["pool"] for key, task in manifest["tasks"].items()},
                             image_root=root / manifest["image_root"], check_images=check_images)


def load_text_benchmark(root: str | os.PathLike, split: str = "test") -> tuple[TextRetrievalData, dict[str, str]]:
    """Load the text-to-text set of a split and its text-only pool (``{did: passage}``)."""
    root = Path(root)
    files = json.loads((root / "manifest.json").read_text(encoding="utf-8"))["text"][split]
    corpus = {record["did"]: record["txt"] for _, record in read_jsonl(root / files["corpus"])}
    return TextRetrievalData.load(root / files["queries"]), corpus
