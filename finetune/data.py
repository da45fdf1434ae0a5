"""M-BEIR-format data: loading, up-front validation, and conversion to items and contrastive examples.

Files (MMEMBED_FORMAT.md): queries jsonl (``qid`` "datasetid:n", ``query_txt``, ``query_img_path``,
``query_modality``, ``query_src_content``, ``pos_cand_list``, ``neg_cand_list``, ``task_id``), candidate
pool jsonl (``did``, ``txt``, ``img_path``, ``modality``, ``src_content``), qrels (``qid 0 did 1 task_id``)
and an instruction tsv like UniIR's ``query_instructions.tsv`` (columns ``dataset_id``,
``query_modality``, ``cand_modality``, ``prompt_1`` .. ``prompt_n``; other columns are ignored). Without
a tsv the instructions come from :mod:`mmembed_rag.instructions`. Text-to-text retrieval data (jsonl:
``query``, ``positives``, optional ``negatives`` and ``qid``) is :class:`TextRetrievalData`.

Everything is checked before anything is used: the first ``max_problems`` problems (file and line
each) are collected and raised together as one :class:`DataError`.
"""

from __future__ import annotations

import bisect
import csv
import json
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from mmembed_rag.errors import MMEmbedError
from mmembed_rag.instructions import M_BEIR_DATASETS, M_BEIR_TASKS, UnknownTaskError, instructions_for
from mmembed_rag.items import MultimodalItem

from .examples import ContrastiveExample

__all__ = [
    "MODALITIES", "DataError", "DataProblem", "MBEIRQuery", "MBEIRCandidate", "MBEIRDataset",
    "TextQuery", "TextRetrievalData", "ContrastiveDataset", "DEFAULT_TEXT_INSTRUCTION", "read_jsonl",
    "write_jsonl_atomic", "load_instructions", "load_qrels", "task_key", "dataset_id_of", "resolve_image",
]

MODALITIES = ("text", "image", "image,text")
_SHORT = {"text": "t", "image": "i", "image,text": "it"}
_QID = re.compile(r"^(\d+):\S+$")
PathLike = str | os.PathLike
NegativeSource = Literal["auto", "listed", "random", "none"]


@dataclass(frozen=True)
class DataProblem:
    """One problem found while loading: where it is and what is wrong."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


class DataError(MMEmbedError, ValueError):
    """Training or evaluation data is malformed; ``problems`` lists the first problems found.

    Attributes:
        problems: the collected :class:`DataProblem` (at most the loader's ``max_problems``).
        total: how many problems were found in all.
    """

    def __init__(self, problems: Sequence[DataProblem], total: int | None = None) -> None:
        self.problems = list(problems)
        self.total = total if total is not None else len(self.problems)
        shown = f" (showing the first {len(self.problems)})" if self.total > len(self.problems) else ""
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{self.total} problem(s) in the data{shown}:\n{lines}")


class _Problems:
    """Collects problems, keeping the first ``limit``."""

    def __init__(self, limit: int) -> None:
        self.items: list[DataProblem] = []
        self.total = 0
        self.limit = limit

    def add(self, file: PathLike, line: int | None, message: str) -> None:
        self.total += 1
        if len(self.items) < self.limit:
            self.items.append(DataProblem(str(file), line, message))

    def raise_if_any(self) -> None:
        if self.total:
            raise DataError(self.items, self.total)


def task_key(dataset_id: int, task_id: int) -> str:
    """Batch-grouping key of an M-BEIR (dataset, task) pair, the catalog name when it has one ("mscoco_t2i")."""
    query, cand = M_BEIR_TASKS[task_id]
    name = M_BEIR_DATASETS.get(dataset_id, f"dataset{dataset_id}").lower()
    return f"{name}_{_SHORT[query]}2{_SHORT[cand]}"


def dataset_id_of(identifier: str) -> int:
    """The dataset id prefix of an M-BEIR qid or did ("9:123" -> 9)."""
    return int(identifier.split(":", 1)[0])


@dataclass(frozen=True)
class MBEIRQuery:
    """One M-BEIR query record; ``where`` ("file:line") is kept for messages only."""

    qid: str
    task_id: int
    query_modality: str
    query_txt: str | None = None
    query_img_path: str | None = None
    pos_cand_list: tuple[str, ...] = ()
    neg_cand_list: tuple[str, ...] = ()
    query_src_content: Any = None
    where: str = field(default="", compare=False, repr=False)

    @property
    def dataset_id(self) -> int:
        return dataset_id_of(self.qid)

    @property
    def target_modality(self) -> str:
        """The candidate modality this query's task asks for."""
        return M_BEIR_TASKS[self.task_id][1]

    @property
    def task(self) -> str:
        return task_key(self.dataset_id, self.task_id)

    def to_record(self) -> dict[str, Any]:
        """The M-BEIR jsonl record."""
        return {"qid": self.qid, "query_txt": self.query_txt, "query_img_path": self.query_img_path,
                "query_modality": self.query_modality, "query_src_content": self.query_src_content,
                "pos_cand_list": list(self.pos_cand_list), "neg_cand_list": list(self.neg_cand_list),
                "task_id": self.task_id}


@dataclass(frozen=True)
class MBEIRCandidate:
    """One M-BEIR candidate-pool record."""

    did: str
    modality: str
    txt: str | None = None
    img_path: str | None = None
    src_content: Any = None
    where: str = field(default="", compare=False, repr=False)

    def to_record(self) -> dict[str, Any]:
        return {"did": self.did, "txt": self.txt, "img_path": self.img_path, "modality": self.modality,
                "src_content": self.src_content}


def read_jsonl(path: PathLike, problems: _Problems | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line (1-based numbers).

    Raises:
        DataError: a line is not a JSON object (names the file and line); with ``problems`` given the
            line is recorded there instead and skipped.
    """
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record, reason = None, f"malformed JSON ({exc.msg} at column {exc.colno})"
            else:
                reason = f"expected a JSON object, got {type(record).__name__}"
            if isinstance(record, dict):
                yield number, record
                continue
            if problems is None:
                raise DataError([DataProblem(str(path), number, reason)])
            problems.add(path, number, reason)


def write_jsonl_atomic(path: PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Write jsonl to a temp file in the same directory, then ``os.replace`` it over ``path``.

    A failure part-way (an exception, a kill) leaves any previous ``path`` untouched and no temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_instructions(path: PathLike) -> dict[tuple[int, int], tuple[str, ...]]:
    """Read a UniIR-style instruction tsv into ``{(dataset_id, task_id): (prompt_1, ...)}``.

    Raises:
        DataError: missing columns, unknown modalities, a modality pair that is no M-BEIR task, or a row
            without prompts (each with its line).
    """
    by_modality = {modalities: task for task, modalities in M_BEIR_TASKS.items()}
    problems, table = _Problems(20), {}
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        missing = {"dataset_id", "query_modality", "cand_modality"} - set(reader.fieldnames or ())
        if missing:
            raise DataError([DataProblem(str(path), 1, f"missing column(s) {', '.join(sorted(missing))}")])
        prompt_cols = [c for c in reader.fieldnames or () if c.startswith("prompt_")]
        for row in reader:
            line = reader.line_num
            pair = ((row["query_modality"] or "").strip(), (row["cand_modality"] or "").strip())
            prompts = tuple(p.strip() for c in prompt_cols if (p := row.get(c)) and p.strip())
            if pair not in by_modality:
                problems.add(path, line, f"modalities {pair[0]!r} -> {pair[1]!r} are no M-BEIR task")
            elif not (row["dataset_id"] or "").strip().isdigit():
                problems.add(path, line, f"dataset_id must be an integer, got {row['dataset_id']!r}")
            elif not prompts:
                problems.add(path, line, "no prompts")
            else:
                table[(int(row["dataset_id"]), by_modality[pair])] = prompts
    problems.raise_if_any()
    return table


def load_qrels(path: PathLike, problems: _Problems | None = None) -> dict[str, set[str]]:
    """Read M-BEIR qrels (``qid 0 did relevance [task_id]``) into ``{qid: {relevant dids}}``."""
    own = problems or _Problems(20)
    qrels: dict[str, set[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (4, 5) or not parts[3].lstrip("-").isdigit():
                own.add(path, number, f"expected 'qid 0 did relevance task_id', got {line.strip()!r}")
            elif int(parts[3]) > 0:
                qrels.setdefault(parts[0], set()).add(parts[2])
    if problems is None:
        own.raise_if_any()
    return qrels


def _paths(spec: PathLike | Sequence[PathLike]) -> list[Path]:
    return [Path(spec)] if isinstance(spec, (str, os.PathLike)) else [Path(p) for p in spec]


def _opt_str(record: dict, key: str) -> str | None:
    value = record.get(key)
    return value if isinstance(value, str) and value.strip() else None


def _check_fields(label: str, key: str, text: str | None, image: str | None, modality: Any,
                  where: tuple[Path, int], problems: _Problems, image_root: Path | None, check_images: bool) -> bool:
    """Checks shared by queries and candidates: modality string, emptiness, modality vs fields, image file."""
    if modality not in MODALITIES:
        problems.add(*where, f"{label}: bad {key} {modality!r}; expected one of {', '.join(map(repr, MODALITIES))}")
        return False
    if text is None and image is None:
        problems.add(*where, f"{label}: empty, no text and no image")
        return False
    for part, value in (("image", image), ("text", text)):
        if part in modality.split(",") and value is None:
            problems.add(*where, f"{label}: {key} {modality!r} but no {part}")
            return False
    if check_images and image is not None and "image" in modality and not resolve_image(image, image_root).is_file():
        problems.add(*where, f"{label}: missing image file {str(resolve_image(image, image_root))!r}")
        return False
    return True


def resolve_image(img_path: str, image_root: Path | None) -> Path:
    """Where an M-BEIR ``img_path`` lives: under ``image_root`` when given, else as written."""
    return image_root / img_path if image_root is not None else Path(img_path)


def _id_list(record: dict, key: str, where: tuple[Path, int], problems: _Problems) -> tuple[str, ...] | None:
    value = record.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add(*where, f"{key} must be a list of candidate ids, got {value!r}")
        return None
    return tuple(value)


def _parse_query(record: dict, where: tuple[Path, int], problems: _Problems, image_root: Path | None,
                 check_images: bool) -> MBEIRQuery | None:
    qid, task_id, modality = record.get("qid"), record.get("task_id"), record.get("query_modality")
    if not isinstance(qid, str) or not _QID.match(qid):
        problems.add(*where, f"qid must be 'datasetid:n', got {qid!r}")
        return None
    if not isinstance(task_id, int) or task_id not in M_BEIR_TASKS:
        problems.add(*where, f"query {qid}: task_id {task_id!r} is no M-BEIR task ({sorted(M_BEIR_TASKS)})")
        return None
    text, image = _opt_str(record, "query_txt"), _opt_str(record, "query_img_path")
    if not _check_fields(f"query {qid}", "query_modality", text, image, modality, where, problems, image_root,
                         check_images):
        return None
    if modality != M_BEIR_TASKS[task_id][0]:
        problems.add(*where, f"query {qid}: query_modality {modality!r} does not match task {task_id} "
                             f"({' -> '.join(M_BEIR_TASKS[task_id])})")
        return None
    pos, neg = _id_list(record, "pos_cand_list", where, problems), _id_list(record, "neg_cand_list", where, problems)
    if pos is None or neg is None:
        return None
    if not pos:
        problems.add(*where, f"query {qid}: pos_cand_list is empty")
        return None
    return MBEIRQuery(qid, task_id, modality, text if "text" in modality else None,
                      image if "image" in modality else None, pos, neg, record.get("query_src_content"),
                      where=f"{where[0]}:{where[1]}")


def _parse_candidate(record: dict, where: tuple[Path, int], problems: _Problems, image_root: Path | None,
                     check_images: bool) -> MBEIRCandidate | None:
    did, modality = record.get("did"), record.get("modality")
    if not isinstance(did, str) or not _QID.match(did):
        problems.add(*where, f"did must be 'datasetid:n', got {did!r}")
        return None
    text, image = _opt_str(record, "txt"), _opt_str(record, "img_path")
    if not _check_fields(f"candidate {did}", "modality", text, image, modality, where, problems, image_root,
                         check_images):
        return None
    return MBEIRCandidate(did, modality, text if "text" in modality else None, image if "image" in modality else None,
                          record.get("src_content"), where=f"{where[0]}:{where[1]}")


@dataclass
class MBEIRDataset:
    """Validated M-BEIR queries with their candidate pool and instructions.

    Attributes:
        queries: the queries, in file order.
        pool: candidate id -> candidate (the global pool for these queries).
        instructions: (dataset_id, task_id) -> instruction paraphrases, for every pair in ``queries``.
        image_root: directory ``img_path`` values are relative to (``None``: as written).
        qrels: qid -> relevant dids from a qrels file; ``None`` means ``pos_cand_list`` is used.
        local_pools: task key -> candidate ids of that task's local pool; tasks not listed use the
            M-BEIR rule: candidates of the query's dataset in the task's target modality.
    """

    queries: list[MBEIRQuery]
    pool: dict[str, MBEIRCandidate]
    instructions: dict[tuple[int, int], tuple[str, ...]]
    image_root: Path | None = None
    qrels: dict[str, set[str]] | None = None
    local_pools: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, queries: PathLike | Sequence[PathLike], pool: PathLike | Sequence[PathLike], *,
             instructions: PathLike | None = None, qrels: PathLike | None = None,
             local_pools: Mapping[str, PathLike] | None = None, image_root: PathLike | None = None,
             check_images: bool = True, max_problems: int = 20) -> MBEIRDataset:
        """Load and validate queries, pool(s), optional qrels, instructions and local pools.

        Args:
            queries: one or more queries jsonl files.
            pool: one or more candidate pool jsonl files (together: the global pool).
            instructions: UniIR-style tsv; ``None`` uses the :mod:`mmembed_rag.instructions` catalog.
            qrels: qrels file used for evaluation instead of ``pos_cand_list``.
            local_pools: task key ("mscoco_t2i") -> candidate file listing that task's local pool.
            image_root: directory image paths are relative to.
            check_images: check that every image file exists.
            max_problems: how many problems to collect before giving up.

        Raises:
            DataError: malformed lines, bad modalities, empty queries, missing images, unknown or absent
                candidate ids, duplicate ids, pairs without instructions; each with file and line.
        """
        problems = _Problems(max_problems)
        root = Path(image_root) if image_root is not None else None
        cands: dict[str, MBEIRCandidate] = {}
        for path in _paths(pool):
            for line, record in read_jsonl(path, problems):
                cand = _parse_candidate(record, (path, line), problems, root, check_images)
                if cand is not None and cand.did in cands:
                    problems.add(path, line, f"duplicate candidate id {cand.did!r} (first at {cands[cand.did].where})")
                elif cand is not None:
                    cands[cand.did] = cand
        parsed: dict[str, MBEIRQuery] = {}
        for path in _paths(queries):
            for line, record in read_jsonl(path, problems):
                query = _parse_query(record, (path, line), problems, root, check_images)
                if query is not None and query.qid in parsed:
                    problems.add(path, line, f"duplicate qid {query.qid!r} (first at {parsed[query.qid].where})")
                elif query is not None:
                    parsed[query.qid] = query
        table = load_instructions(instructions) if instructions is not None else {}
        source = str(instructions) if instructions is not None else "mmembed_rag.instructions catalog"
        resolved: dict[tuple[int, int], tuple[str, ...]] = {}
        for query in parsed.values():
            file, _, line = query.where.rpartition(":")
            for did in query.pos_cand_list:
                if did not in cands:
                    problems.add(file, int(line), f"query {query.qid}: positive {did!r} is not in the candidate pool")
            for did in query.neg_cand_list:
                if did not in cands:
                    problems.add(file, int(line), f"query {query.qid}: unknown candidate id {did!r} in neg_cand_list")
            pair = (query.dataset_id, query.task_id)
            if pair not in resolved:
                try:
                    resolved[pair] = table[pair] if instructions is not None else instructions_for(*pair).variants
                except (KeyError, UnknownTaskError):
                    resolved[pair] = ()
                    problems.add(file, int(line), f"no instructions for dataset {pair[0]}, task {pair[1]} in {source}")
        relevant = load_qrels(qrels, problems) if qrels is not None else None
        for qid, dids in (relevant or {}).items():
            for did in sorted(dids - cands.keys()):
                problems.add(qrels, None, f"query {qid}: unknown candidate id {did!r}")
        locals_: dict[str, tuple[str, ...]] = {}
        for key, path in (local_pools or {}).items():
            locals_[key] = tuple(record.get("did") for _, record in read_jsonl(path, problems))
            for did in locals_[key]:
                if did not in cands:
                    problems.add(path, None, f"local pool {key!r}: candidate {did!r} is not in the global pool")
        problems.raise_if_any()
        return cls(list(parsed.values()), cands, resolved, root, relevant, locals_)

    @property
    def tasks(self) -> list[str]:
        """Task key of each query, parallel to ``queries`` (what :class:`TaskBatchSampler` groups by)."""
        return [q.task for q in self.queries]

    def positives(self, query: MBEIRQuery) -> set[str]:
        """Relevant candidate ids: from qrels when loaded, else ``pos_cand_list``."""
        if self.qrels is not None:
            return self.qrels.get(query.qid, set())
        return set(query.pos_cand_list)

    def instruction(self, query: MBEIRQuery, rng: random.Random | None = None) -> str:
        """The query's task instruction: the first paraphrase, or one drawn with ``rng``."""
        options = self.instructions[(query.dataset_id, query.task_id)]
        return options[0] if rng is None else rng.choice(options)

    def query_item(self, query: MBEIRQuery, instruction: str | None = None) -> MultimodalItem:
        """The query as an item, carrying ``instruction`` (default: the task's first paraphrase)."""
        image = resolve_image(query.query_img_path, self.image_root) if query.query_img_path else None
        return MultimodalItem(text=query.query_txt, image=image,
                              instruction=instruction if instruction is not None else self.instruction(query))

    def candidate_item(self, candidate: MBEIRCandidate | str) -> MultimodalItem:
        """A candidate (or candidate id) as a document item; documents never carry an instruction."""
        cand = self.pool[candidate] if isinstance(candidate, str) else candidate
        image = resolve_image(cand.img_path, self.image_root) if cand.img_path else None
        return MultimodalItem(text=cand.txt, image=image)

    def local_pool(self, task: str) -> tuple[str, ...]:
        """Candidate ids of a task's local pool (explicit, or same dataset and target modality)."""
        if task not in self.local_pools:
            tasks = {q.task: q for q in self.queries}
            if task not in tasks:
                raise KeyError(f"no queries of task {task!r}; tasks: {sorted(tasks)}")
            query = tasks[task]
            self.local_pools[task] = tuple(did for did, cand in self.pool.items() if dataset_id_of(did) ==
                                           query.dataset_id and cand.modality == query.target_modality)
        return self.local_pools[task]

    def example(self, index: int, *, seed: int = 0, epoch: int = 0, num_negatives: int = 1,
                negatives: NegativeSource = "auto") -> ContrastiveExample:
        """The contrastive example of query ``index``, a pure function of (seed, epoch, qid).

        Args:
            index: position in ``queries``.
            seed, epoch: the instruction, positive and negatives are drawn with an RNG seeded by these and
                the qid, so they rotate per epoch and never depend on iteration order or worker count.
            num_negatives: negatives per example.
            negatives: ``"auto"`` (``neg_cand_list`` when non-empty, else random pool candidates),
                ``"listed"`` (only ``neg_cand_list``; possibly fewer), ``"random"`` or ``"none"``.
        """
        query = self.queries[index]
        rng = random.Random(f"{seed}:{epoch}:{query.qid}")
        instruction = self.instruction(query, rng)
        positive = rng.choice(query.pos_cand_list)
        chosen = _draw_negatives(rng, query.neg_cand_list, self._pool_ids, set(query.pos_cand_list), num_negatives,
                                 negatives)
        return ContrastiveExample(self.query_item(query, instruction), self.candidate_item(positive),
                                  tuple(self.candidate_item(did) for did in chosen), query.task, query.qid)

    def examples(self, *, seed: int = 0, epoch: int = 0, num_negatives: int = 1,
                 negatives: NegativeSource = "auto") -> list[ContrastiveExample]:
        """:meth:`example` for every query, in order."""
        return [self.example(i, seed=seed, epoch=epoch, num_negatives=num_negatives, negatives=negatives)
                for i in range(len(self.queries))]

    @cached_property
    def _pool_ids(self) -> list[str]:
        return list(self.pool)

    def write_queries(self, path: PathLike, queries: Sequence[MBEIRQuery] | None = None) -> None:
        """Write ``queries`` (default: this dataset's) as M-BEIR jsonl, atomically."""
        write_jsonl_atomic(path, (q.to_record() for q in (self.queries if queries is None else queries)))


def _draw_negatives(rng: random.Random, listed: Sequence[str], pool: Sequence[str], exclude: set[str], n: int,
                    source: NegativeSource) -> list[str]:
    """Listed negatives (``"auto"``/``"listed"``) or distinct random ids of ``pool`` outside ``exclude`` (a subset)."""
    if source == "none" or n <= 0:
        return []
    if listed and source in ("auto", "listed"):
        return rng.sample(list(listed), min(n, len(listed)))
    if source == "listed":
        return []
    n = min(n, len(pool) - len(exclude))  # pool ids are distinct and hold every excluded (positive) id
    picked: list[str] = []
    while len(picked) < n:  # rejection sampling: positives are a vanishing share of a real pool
        did = pool[rng.randrange(len(pool))]
        if did not in exclude and did not in picked:
            picked.append(did)
    return picked


DEFAULT_TEXT_INSTRUCTION = "Given a question, retrieve passages that answer the question"


@dataclass(frozen=True)
class TextQuery:
    """One text-to-text training or evaluation query (passages are given as text)."""

    qid: str
    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    where: str = field(default="", compare=False, repr=False)


@dataclass
class TextRetrievalData:
    """Text retrieval pairs for continual text-to-text fine-tuning and nDCG evaluation.

    Jsonl lines: ``{"query": str, "positives": [str, ...], "negatives": [str, ...], "qid": str}``
    (``negatives`` and ``qid`` optional; a missing qid becomes ``"text:<line>"``).

    Attributes:
        queries: the queries, in file order.
        instructions: instruction paraphrases sampled per example (the first one for evaluation).
        task: the task key all examples carry (what :class:`TaskBatchSampler` groups by).
    """

    queries: list[TextQuery]
    instructions: tuple[str, ...] = (DEFAULT_TEXT_INSTRUCTION,)
    task: str = "text"

    @classmethod
    def load(cls, path: PathLike, *, instructions: str | Sequence[str] = DEFAULT_TEXT_INSTRUCTION,
             task: str = "text", max_problems: int = 20) -> TextRetrievalData:
        """Load and validate a text retrieval jsonl file.

        Raises:
            DataError: malformed lines, empty queries, missing/empty/non-string positives or negatives,
                duplicate qids (each with file and line).
        """
        problems, queries, seen = _Problems(max_problems), [], {}
        for line, record in read_jsonl(path, problems):
            qid, text = record.get("qid", f"text:{line}"), record.get("query")
            lists = {key: record.get(key, []) for key in ("positives", "negatives")}
            bad = [key for key, value in lists.items() if not isinstance(value, list)
                   or not all(isinstance(v, str) and v.strip() for v in value)]
            if not isinstance(text, str) or not text.strip():
                problems.add(path, line, f"query {qid}: empty query text")
            elif bad:
                problems.add(path, line, f"query {qid}: {bad[0]} must be a list of non-empty strings")
            elif not lists["positives"]:
                problems.add(path, line, f"query {qid}: no positives")
            elif qid in seen:
                problems.add(path, line, f"duplicate qid {qid!r} (first at line {seen[qid]})")
            else:
                seen[qid] = line
                queries.append(TextQuery(str(qid), text, tuple(lists["positives"]), tuple(lists["negatives"]),
                                         where=f"{path}:{line}"))
        problems.raise_if_any()
        options = (instructions,) if isinstance(instructions, str) else tuple(instructions)
        return cls(queries, options, task)

    @property
    def tasks(self) -> list[str]:
        return [self.task] * len(self.queries)

    @cached_property
    def _passages(self) -> list[str]:
        return sorted({p for q in self.queries for p in q.positives + q.negatives})

    def query_item(self, query: TextQuery, instruction: str | None = None) -> MultimodalItem:
        return MultimodalItem(text=query.query, instruction=instruction or self.instructions[0])

    def example(self, index: int, *, seed: int = 0, epoch: int = 0, num_negatives: int = 1,
                negatives: NegativeSource = "auto") -> ContrastiveExample:
        """As :meth:`MBEIRDataset.example`; random negatives are other queries' passages."""
        query = self.queries[index]
        rng = random.Random(f"{seed}:{epoch}:{query.qid}")
        instruction = rng.choice(self.instructions)
        positive = rng.choice(query.positives)
        chosen = _draw_negatives(rng, query.negatives, self._passages, set(query.positives), num_negatives, negatives)
        return ContrastiveExample(self.query_item(query, instruction), MultimodalItem(text=positive),
                                  tuple(MultimodalItem(text=p) for p in chosen), self.task, query.qid)


class ContrastiveDataset:
    """Map-style dataset over one or more sources, for ``DataLoader(batch_sampler=TaskBatchSampler(...))``.

    Index ``i`` runs over the sources' queries back to back; ``dataset[i]`` is a
    :class:`~mmembed_rag.finetune.examples.ContrastiveExample` drawn for the current epoch (call
    :meth:`set_epoch` with the sampler's). Give the DataLoader a ``collate_fn`` (e.g. ``list``): examples
    are not tensors.

    Args:
        sources: :class:`MBEIRDataset` and/or :class:`TextRetrievalData` objects.
        seed, num_negatives, negatives: passed to each source's ``example``.
    """

    def __init__(self, sources: Sequence[MBEIRDataset | TextRetrievalData], *, seed: int = 0,
                 num_negatives: int = 1, negatives: NegativeSource = "auto") -> None:
        self.sources = list(sources)
        self.seed, self.num_negatives, self.negatives, self.epoch = seed, num_negatives, negatives, 0
        self._offsets = [0]
        for source in self.sources:
            self._offsets.append(self._offsets[-1] + len(source.queries))
        self.tasks = [key for source in self.sources for key in source.tasks]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, index: int) -> ContrastiveExample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        which = bisect.bisect_right(self._offsets, index) - 1
        return self.sources[which].example(index - self._offsets[which], seed=self.seed, epoch=self.epoch,
                                           num_negatives=self.num_negatives, negatives=self.negatives)
