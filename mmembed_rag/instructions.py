"""Catalog of the M-BEIR task instructions MM-Embed was trained with.

MM-Embed is instruction-tuned: a query is embedded together with a short natural-language
instruction that names the retrieval task (what the query is, what should be retrieved). The
instructions come from the M-BEIR benchmark of UniIR (``instructions/query_instructions.tsv`` in
the ``TIGER-Lab/M-BEIR`` dataset), which holds several human-written paraphrases
(``prompt_1``, ``prompt_2``, ...) for every (dataset, task) pair. MM-Embed uses the first
paraphrase as the fixed instruction of each pair; the other paraphrases are kept here as
:attr:`TaskInstruction.variants` (for example to sample instructions during fine-tuning).

Instructions apply to queries only; documents (candidates) are embedded without one.

Typical use::

    from mmembed_rag.instructions import get_instruction, resolve_instruction

    get_instruction("visualnews_t2i")
    # 'Identify the news-related image in line with the described event.'
    resolve_instruction("Find a recipe that uses the ingredients in this photo.")
    # free-form instructions are passed through (stripped)
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass

from mmembed_rag.errors import InvalidItemError, MMEmbedError

__all__ = [
    "M_BEIR_DATASETS",
    "M_BEIR_TASKS",
    "TASK_INSTRUCTIONS",
    "TaskInstruction",
    "UnknownTaskError",
    "get_instruction",
    "instructions_for",
    "resolve_instruction",
]

TEXT = "text"
IMAGE = "image"
IMAGE_TEXT = "image,text"

M_BEIR_DATASETS: Mapping[int, str] = types.MappingProxyType(
    {
        0: "VisualNews",
        1: "Fashion200K",
        2: "WebQA",
        3: "EDIS",
        4: "NIGHTS",
        5: "OVEN",
        6: "InfoSeek",
        7: "FashionIQ",
        8: "CIRR",
        9: "MSCOCO",
    }
)
"""M-BEIR dataset id -> dataset name (ids as in M-BEIR's ``qid``/``did`` prefixes)."""

M_BEIR_TASKS: Mapping[int, tuple[str, str]] = types.MappingProxyType(
    {
        0: (TEXT, IMAGE),
        1: (TEXT, TEXT),
        2: (TEXT, IMAGE_TEXT),
        3: (IMAGE, TEXT),
        4: (IMAGE, IMAGE),
        6: (IMAGE_TEXT, TEXT),
        7: (IMAGE_TEXT, IMAGE),
        8: (IMAGE_TEXT, IMAGE_TEXT),
    }
)
"""M-BEIR task id -> (query modality, candidate modality), as M-BEIR modality strings.

Task id 5 (image -> (image, text)) is not part of M-BEIR's evaluated tasks and has no
instructions, so it is absent.
"""

# Short suffix used in catalog names, per task id: "t" text, "i" image, "it" image+text.
_TASK_SUFFIXES: Mapping[int, str] = types.MappingProxyType(
    {0: "t2i", 1: "t2t", 2: "t2it", 3: "i2t", 4: "i2i", 6: "it2t", 7: "it2i", 8: "it2it"}
)

# A snake_case identifier such as "mscoco_t2i": looks like a catalog name, not like an instruction
# sentence, so an unknown one is reported as a mistyped name instead of being embedded as text.
_NAME_PATTERN = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)+")


@dataclass(frozen=True)
class TaskInstruction:
    """One M-BEIR (dataset, task) pair and the instructions written for it.

    Attributes:
        name: Catalog key, ``"<dataset>_<task suffix>"`` in lower case, e.g. ``"visualnews_t2i"``.
        dataset: M-BEIR dataset name, e.g. ``"VisualNews"``.
        dataset_id: M-BEIR dataset id (0-9).
        task_id: M-BEIR task id (see :data:`M_BEIR_TASKS`).
        query_modality: Modality of the query: ``"text"``, ``"image"`` or ``"image,text"``.
        target_modality: Modality of the retrieved candidates, same vocabulary.
        instruction: The canonical instruction (M-BEIR ``prompt_1``), the one MM-Embed uses.
        variants: All M-BEIR paraphrases for the pair, canonical one first.
    """

    name: str
    dataset: str
    dataset_id: int
    task_id: int
    query_modality: str
    target_modality: str
    instruction: str
    variants: tuple[str, ...]

    def __post_init__(self) -> None:
        """Check the entry is self-consistent (catches typos in the catalog below).

        Raises:
            ValueError: If the modalities disagree with the task id, or the canonical
                instruction is not the first variant.
        """
        if M_BEIR_TASKS.get(self.task_id) != (self.query_modality, self.target_modality):
            raise ValueError(f"{self.name}: modalities do not match M-BEIR task {self.task_id}")
        if not self.variants or self.variants[0] != self.instruction:
            raise ValueError(f"{self.name}: the canonical instruction must be the first variant")


class UnknownTaskError(MMEmbedError, KeyError):
    """A task instruction name or (dataset id, task id) pair is not in the catalog."""

    def __init__(self, message: str) -> None:
        """Store the message.

        Args:
            message: Human-readable explanation, shown as-is by ``str()``.
        """
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        """Return the message without the quotes ``KeyError`` adds around its argument."""
        return self.message


def _entry(dataset_id: int, task_id: int, variants: tuple[str, ...]) -> TaskInstruction:
    dataset = M_BEIR_DATASETS[dataset_id]
    query_modality, target_modality = M_BEIR_TASKS[task_id]
    return TaskInstruction(
        name=f"{dataset.lower()}_{_TASK_SUFFIXES[task_id]}",
        dataset=dataset,
        dataset_id=dataset_id,
        task_id=task_id,
        query_modality=query_modality,
        target_modality=target_modality,
        instruction=variants[0],
        variants=variants,
    )


# Instruction texts: M-BEIR's query_instructions.tsv (UniIR, Table "Summary of the M-BEIR
# instructions"), prompt_1 first. Kept verbatim, including their original wording.
_ENTRIES: tuple[TaskInstruction, ...] = (
    # --- task 0: text -> image
    _entry(0, 0, (
        "Identify the news-related image in line with the described event.",
        "Display an image that best captures the following caption from the news.",
        "Based on the caption, provide the most fitting image for the news story.",
        "I want you to retrieve an image of this news caption.",
    )),
    _entry(9, 0, (
        "Find me an everyday image that matches the given caption.",
        "Identify the image showcasing the described everyday scene.",
        "I want to retrieve an image of this daily life description.",
        "Show me an image that best captures the following common scene description.",
    )),
    _entry(1, 0, (
        "Based on the following fashion description, retrieve the best matching image.",
        "Match the provided description to the correct fashion item photo.",
        "Identify the fashion image that aligns with the described product.",
        "You need to identify the image that corresponds to the fashion product description provided.",
    )),
    # --- task 1: text -> text
    _entry(2, 1, (
        "Retrieve passages from Wikipedia that provide answers to the following question.",
        "You have to find a Wikipedia paragraph that provides the answer to the question.",
        "I want to find an answer to the question. Can you find some snippets that provide evidence from "
        "Wikipedia?",
        "I'm looking for a Wikipedia snippet that answers this question.",
    )),
    # --- task 2: text -> (image, text)
    _entry(3, 2, (
        "Find a news image that matches the provided caption.",
        "Identify the news photo for the given caption.",
        "Can you pair this news caption with the right image?",
        "I'm looking for an image that aligns with this news caption.",
    )),
    _entry(2, 2, (
        "Find a Wikipedia image that answers this question.",
        "Provide with me an image from Wikipedia to answer this question.",
        "I want to know the answer to this question. Please find the related Wikipedia image for me.",
        "You need to retrieve an evidence image from Wikipedia to address this question.",
    )),
    # --- task 3: image -> text
    _entry(0, 3, (
        "Find a caption for the news in the given photo.",
        "Based on the shown image, retrieve an appropriate news caption.",
        "Provide a news-related caption for the displayed image.",
        "I want to know the caption for this news image.",
    )),
    _entry(9, 3, (
        "Find an image caption describing the following everyday image.",
        "Retrieve the caption for the displayed day-to-day image.",
        "Can you find a caption talking about this daily life image?",
        "I want to locate the caption that best describes this everyday scene image.",
    )),
    _entry(1, 3, (
        "Find a product description for the fashion item in the image.",
        "Based on the displayed image, retrieve the corresponding fashion description.",
        "Can you retrieve the description for the fashion item in the image?",
        "I want to find a matching description for the fashion item in this image.",
    )),
    # --- task 4: image -> image
    _entry(4, 4, (
        "Find a day-to-day image that looks similar to the provided image.",
        "Which everyday image is the most similar to the reference image?",
        "Find a daily life image that is identical to the given one.",
        "You need to identify the common scene image that aligns most with this reference image.",
    )),
    # --- task 6: (image, text) -> text
    _entry(5, 6, (
        "Retrieve a Wikipedia paragraph that provides an answer to the given query about the image.",
        "Determine the Wikipedia snippet that identifies the visual entity in the image.",
        "I want to find a paragraph from Wikipedia that answers my question about this image.",
        "You have to find a Wikipedia segment that identifies this image's subject.",
    )),
    _entry(6, 6, (
        "Retrieve a Wikipedia paragraph that provides an answer to the given query about the image.",
        "Determine the Wikipedia snippet that matches the question of this image.",
        "I want to find a paragraph from Wikipedia that answers my question about this image.",
        "You have to find a Wikipedia segment that answers the question about the displayed image.",
    )),
    # --- task 7: (image, text) -> image
    _entry(7, 7, (
        "Find a fashion image that aligns with the reference image and style note.",
        "With the reference image and modification instructions, find the described fashion look.",
        "Given the reference image and design hint, identify the matching fashion image.",
        "I'm looking for a similar fashion product image with the described style changes.",
    )),
    _entry(8, 7, (
        "Retrieve a day-to-day image that aligns with the modification instructions of the provided image.",
        "Pull up a common scene image like this one, but with the modifications I asked for.",
        "Can you help me find a daily image that meets the modification from the given image?",
        "I'm looking for a similar everyday image with the described changes.",
    )),
    # --- task 8: (image, text) -> (image, text)
    _entry(5, 8, (
        "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image.",
        "Determine the Wikipedia image-snippet pair that clarifies the entity in this picture.",
        "I want to find an image and subject description from Wikipedia that answers my question about "
        "this image.",
        "I want to know the subject in the photo. Can you provide the relevant Wikipedia section and image?",
    )),
    _entry(6, 8, (
        "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image.",
        "Determine the Wikipedia image-snippet pair that matches my question about this image.",
        "I want to find an image and subject description from Wikipedia that answers my question about "
        "this image.",
    )),
)

TASK_INSTRUCTIONS: Mapping[str, TaskInstruction] = types.MappingProxyType(
    {entry.name: entry for entry in _ENTRIES}
)
"""Catalog name -> :class:`TaskInstruction`, for the 16 (dataset, task) pairs evaluated in M-BEIR."""

_BY_PAIR: Mapping[tuple[int, int], TaskInstruction] = types.MappingProxyType(
    {(entry.dataset_id, entry.task_id): entry for entry in _ENTRIES}
)


def _normalize_name(name: str) -> str:
    return name.strip().lower()


def _unknown_name_error(name: str) -> UnknownTaskError:
    key = _normalize_name(name)
    suggestions = difflib.get_close_matches(key, list(TASK_INSTRUCTIONS), n=3, cutoff=0.6)
    if not suggestions:
        # Fall back to the names of the same dataset, e.g. "visualnews_x" -> visualnews_*.
        prefix = key.split("_", 1)[0]
        suggestions = [known for known in TASK_INSTRUCTIONS if prefix and known.startswith(prefix + "_")]
    hint = f" Did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return UnknownTaskError(
        f"Unknown M-BEIR task instruction name {name!r}.{hint} "
        f"Known names are the keys of mmembed_rag.instructions.TASK_INSTRUCTIONS: "
        f"{', '.join(sorted(TASK_INSTRUCTIONS))}."
    )


def get_instruction(name: str) -> str:
    """Return the canonical instruction text of a catalog entry.

    Args:
        name: Catalog name such as ``"visualnews_t2i"`` (case and surrounding spaces ignored).

    Returns:
        The instruction MM-Embed was trained with for that (dataset, task) pair.

    Raises:
        UnknownTaskError: If ``name`` is not in :data:`TASK_INSTRUCTIONS`; the message suggests
            close matches.
    """
    if not isinstance(name, str):
        raise UnknownTaskError(f"Task instruction names are strings, got {type(name).__name__}.")
    entry = TASK_INSTRUCTIONS.get(_normalize_name(name))
    if entry is None:
        raise _unknown_name_error(name)
    return entry.instruction


def resolve_instruction(instruction: str | None) -> str | None:
    """Turn a user-supplied instruction argument into the text to embed with a query.

    Args:
        instruction: ``None`` (no instruction), a catalog name such as ``"mscoco_t2i"``, or any
            free-form instruction text.

    Returns:
        ``None`` for ``None``; the canonical instruction text for a catalog name; otherwise the
        free-form instruction with surrounding whitespace removed.

    Raises:
        InvalidItemError: If ``instruction`` is not a string or is empty / whitespace only.
        UnknownTaskError: If ``instruction`` is a single snake_case word shaped like a catalog
            name (e.g. ``"mscoco_t2"``) that is not in the catalog: almost certainly a mistyped
            name rather than a real instruction.
    """
    if instruction is None:
        return None
    if not isinstance(instruction, str):
        raise InvalidItemError(
            f"instruction must be a string or None, got {type(instruction).__name__}."
        )
    text = instruction.strip()
    if not text:
        raise InvalidItemError(
            "instruction is empty; pass None for no instruction, a catalog name such as "
            "'visualnews_t2i', or a non-empty instruction sentence."
        )
    key = text.lower()
    entry = TASK_INSTRUCTIONS.get(key)
    if entry is not None:
        return entry.instruction
    if _NAME_PATTERN.fullmatch(key):
        raise _unknown_name_error(text)
    return text


def instructions_for(dataset_id: int, task_id: int) -> TaskInstruction:
    """Look up the catalog entry of an M-BEIR (dataset id, task id) pair.

    Args:
        dataset_id: M-BEIR dataset id, e.g. 0 for VisualNews (see :data:`M_BEIR_DATASETS`).
        task_id: M-BEIR task id, e.g. 3 for image -> text (see :data:`M_BEIR_TASKS`).

    Returns:
        The matching :class:`TaskInstruction`.

    Raises:
        UnknownTaskError: If M-BEIR has no instructions for that pair; the message lists the
            pairs that exist for the dataset.
    """
    entry = _BY_PAIR.get((dataset_id, task_id))
    if entry is not None:
        return entry
    dataset = M_BEIR_DATASETS.get(dataset_id)
    if dataset is None:
        known = ", ".join(f"{i} ({n})" for i, n in M_BEIR_DATASETS.items())
        raise UnknownTaskError(f"Unknown M-BEIR dataset id {dataset_id!r}; known ids: {known}.")
    available = ", ".join(
        f"task {e.task_id} ({e.query_modality} -> {e.target_modality}, {e.name!r})"
        for e in _ENTRIES
        if e.dataset_id == dataset_id
    )
    raise UnknownTaskError(
        f"M-BEIR has no instructions for {dataset} (dataset {dataset_id}) with task {task_id!r}; "
        f"{dataset} has: {available}."
    )
