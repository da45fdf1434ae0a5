"""Tiny Qwen3-VL checkpoints in the released layouts (Qwen3-VL-Embedding and Qwen3-VL-Reranker), for tests.

``make_tiny_qwen3_vl`` writes a randomly initialised model with the files a Qwen3-VL release has: config.json
in the 4.57-era form the releases carry (``rope_scaling`` with ``mrope_section``), safetensors with the released
key names (the embedder's ``model.visual.*`` / ``model.language_model.*``; the reranker's, and the Instruct
checkpoint's, plus ``lm_head.weight`` unless tied), the Qwen2 byte-level BPE tokenizer with the Qwen special
tokens, the chat template, and the image/video processor configs. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .checkpoint import _add_words

__all__ = ["make_tiny_qwen3_vl", "QWEN_CHAT_TEMPLATE", "QWEN_SPECIAL_TOKENS"]

#: The Qwen2/Qwen3-VL special tokens, in the releases' order (ids follow the learned vocabulary here).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
_WORDS = (
    "a an the this that same but in on of with and or to for from is are was be it its as at by yes no "
    "red green blue yellow purple orange black white gray pink brown colour color bright dark Judge whether "
    "circle square triangle star cross ring diamond shape shapes small large big tiny huge Represent user's input "
    "left right top bottom center middle corner above below next picture image photo chart Query Document Instruct "
    "find show me everyday news caption query document passage question answer which Given search retrieve "
    "what where how why who when animal cat dog bird fish tree house car table chair light relevant candidates "
    "energy chemical glucose photosynthesis converts stored plant water sun one two three meets requirements "
    "identify match matches described event wikipedia snippet evidence election rally system assistant NULL"
).split()

#: The Qwen3-VL Instruct chat template (as its chat_template.json carries it): system text, user text/image/
#: video parts, assistant turns, tool calls and responses.
QWEN_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {%- if messages[0].content is string %}\n            {{- messages[0].content }}\n"
    "        {%- else %}\n            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n                    {{- content.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n        {{- '\\n\\n' }}\n"
    "    {%- endif %}\n    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query."
    "\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n        {{- '<|im_start|>system\\n' }}\n"
    "        {%- if messages[0].content is string %}\n            {{- messages[0].content }}\n"
    "        {%- else %}\n            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n                    {{- content.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- set image_count = namespace(value=0) %}\n{%- set video_count = namespace(value=0) %}\n"
    "{%- for message in messages %}\n    {%- if message.role == \"user\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n"
    "                {%- elif 'text' in content %}\n                    {{- content.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n"
    "            {%- for content_item in message.content %}\n                {%- if 'text' in content_item %}\n"
    "                    {{- content_item.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and message.content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n                {%- endif %}\n                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {%- if message.content is string %}\n            {{- message.content }}\n        {%- else %}\n"
    "            {%- for content in message.content %}\n                {%- if 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)


def _qwen_tokenizer(vocab_size: int) -> Tokenizer:
    """A Qwen2-style byte-level BPE (NFC, the Qwen split regex, no BOS) trained on a small built-in corpus."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False), byte_level])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    words = _WORDS
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) + ".\n" for i in range(400)]
    tok.train_from_iterator(lines + [f" {w}" for w in words] + words, trainer=trainer)
    tok = _add_words(tok, ("yes", "no"))  # single tokens, as in Qwen's vocabulary (the reranker reads their logits)
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    return tok


def _config(ids: dict[str, int], vocab: int, hidden: int, layers: int, vision_hidden: int, vision_layers: int,
            architecture: str, tie: bool) -> dict[str, Any]:
    head_dim = 16
    return {
        "architectures": [architecture],
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"],
            "dtype": "bfloat16", "eos_token_id": ids["<|im_end|>"], "head_dim": head_dim, "hidden_act": "silu",
            "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": 2 * hidden,
            "max_position_embeddings": 262144, "model_type": "qwen3_vl_text", "num_attention_heads": 4,
            "num_hidden_layers": layers, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
            "rope_theta": 5000000, "tie_word_embeddings": tie, "use_cache": True, "vocab_size": vocab,
        },
        "tie_word_embeddings": tie,
        "transformers_version": "4.57.1",
        "vision_config": {
            "deepstack_visual_indexes": list(range(min(2, vision_layers))), "depth": vision_layers,
            "hidden_act": "gelu_pytorch_tanh", "hidden_size": vision_hidden, "in_channels": 3,
            "initializer_range": 0.02, "intermediate_size": 2 * vision_hidden, "model_type": "qwen3_vl",
            "num_heads": 2, "num_position_embeddings": 64, "out_hidden_size": hidden, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
    }


def _tokenizer_files(path: Path, backend: Tokenizer, chat_template: str) -> None:
    (path / "tokenizer.json").write_text(backend.to_str(pretty=True))
    model = json.loads(backend.to_str())["model"]
    (path / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {str(backend.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                           "single_word": False, "special": True} for t in QWEN_SPECIAL_TOKENS}
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]), "bos_token": None,
        "chat_template": chat_template, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 262144, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (path / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]), "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>"}, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2))


def _processor_files(path: Path) -> None:
    common = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "merge_size": 2, "patch_size": 16,
              "processor_class": "Qwen3VLProcessor", "resample": 3, "rescale_factor": 1 / 255,
              "temporal_patch_size": 2}
    image = dict(common, image_processor_type="Qwen2VLImageProcessorFast",
                 size={"longest_edge": 16777216, "shortest_edge": 65536})
    video = dict(common, video_processor_type="Qwen3VLVideoProcessor", fps=2, do_sample_frames=True,
                 size={"longest_edge": 25165824, "shortest_edge": 4096})
    (path / "preprocessor_config.json").write_text(json.dumps(image, indent=2, sort_keys=True))
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True))


def make_tiny_qwen3_vl(path: str | os.PathLike, kind: str = "embedding", seed: int = 0, vocab_size: int = 600,
                       hidden_size: int = 64, layers: int = 2, vision_hidden: int = 32, vision_layers: int = 2,
                       tie_word_embeddings: bool = False, dtype: torch.dtype = torch.bfloat16,
                       answer_scale: float = 8.0) -> Path:
    """Write a randomly initialised Qwen3-VL checkpoint in a released layout to ``path``; return the path.

    Args:
        path: target directory (created).
        kind: ``"embedding"`` (Qwen3-VL-Embedding: no LM head), ``"reranker"`` (Qwen3-VL-Reranker) or
            ``"instruct"`` (a generative Qwen3-VL Instruct checkpoint; same keys as the reranker).
        seed: weights are a function of the seed and sizes only.
        vocab_size: BPE vocabulary before the 14 Qwen special tokens; the embedding is padded to a multiple of 64.
        hidden_size, layers: the language model's width and depth (4 heads of 16, 2 key/value heads).
        vision_hidden, vision_layers: the vision tower's (patch 16, merge 2, temporal patch 2).
        tie_word_embeddings: share ``lm_head`` with the embedding (as the 2B releases do).
        dtype: stored weight dtype (the releases store bfloat16).
        answer_scale: the reranker's ``lm_head`` rows for "yes" and "no" are scaled apart by this so that a random
            model's scores spread over (0, 1) and equality tests of them stay meaningful.

    Example:
        >>> from mmembed_rag import Encoder
        >>> enc = Encoder.from_pretrained(make_tiny_qwen3_vl(tmp_path / "qwen"))
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if kind not in ("embedding", "reranker", "instruct"):
        raise ValueError(f"kind must be 'embedding', 'reranker' or 'instruct', not {kind!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backend = _qwen_tokenizer(vocab_size)
    ids = {t: backend.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = (backend.get_vocab_size() + 63) // 64 * 64
    architecture = "Qwen3VLForEmbedding" if kind == "embedding" else "Qwen3VLForConditionalGeneration"
    raw = _config(ids, vocab, hidden_size, layers, vision_hidden, vision_layers, architecture,
                  tie_word_embeddings and kind != "embedding")
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**raw)).eval()
    if kind != "embedding":
        _spread_answers(model, backend, answer_scale)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if kind == "embedding" or raw["tie_word_embeddings"]:
        state.pop("lm_head.weight")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw["text_config"]["dtype"] = raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    _tokenizer_files(path, backend, QWEN_CHAT_TEMPLATE)
    _processor_files(path)
    if kind != "embedding":
        generation = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                      "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return path


def _spread_answers(model: torch.nn.Module, backend: Tokenizer, scale: float) -> None:
    """Scale the "yes"/"no" rows of ``lm_head`` apart so that random models give scores across (0, 1)."""
    yes, no = backend.token_to_id("yes"), backend.token_to_id("no")
    if yes is None or no is None:
        raise RuntimeError("the tiny tokenizer lost its single 'yes'/'no' tokens")
    with torch.no_grad():
        weight = model.lm_head.weight
        if weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
            return  # tied: the embedding rows are the answer rows; leave them as initialised
        direction = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(1))
        weight[yes] = weight[yes] + scale * direction / direction.norm()
        weight[no] = weight[no] - scale * direction / direction.norm()
