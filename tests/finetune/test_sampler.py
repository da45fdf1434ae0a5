"""TaskBatchSampler: one task per batch, determinism, ratios, drop_last and sharding across ranks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mmembed_rag.finetune.arguments import TrainArguments
from mmembed_rag.finetune.sampler import TaskBatchSampler, training_data
from mmembed_rag.finetune.synthetic import generate_benchmark

TASKS = ["a"] * 23 + ["b"] * 10 + ["c"] * 7


def epoch_batches(sampler: TaskBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_each_batch_holds_one_task_and_len_matches() -> None:
    sampler = TaskBatchSampler(TASKS, 4, seed=0)
    batches = epoch_batches(sampler, 0)
    assert len(batches) == len(sampler) == 23 // 4 + 10 // 4 + 7 // 4 == sampler.__len__()
    assert all(len(b) == 4 and len({TASKS[i] for i in b}) == 1 for b in batches)
    assert sampler.batches_per_task() == {"a": 5, "b": 2, "c": 1}
    used = [i for b in batches for i in b]
    assert len(used) == len(set(used))  # no index twice within an epoch


def test_deterministic_given_seed_and_epoch() -> None:
    one, two = TaskBatchSampler(TASKS, 4, seed=7), TaskBatchSampler(TASKS, 4, seed=7)
    assert epoch_batches(one, 3) == epoch_batches(two, 3)
    assert epoch_batches(one, 0) != epoch_batches(one, 1)
    assert epoch_batches(one, 0) != epoch_batches(TaskBatchSampler(TASKS, 4, seed=8), 0)
    tasks_in_order = [TASKS[b[0]] for b in epoch_batches(one, 0)]
    assert tasks_in_order != sorted(tasks_in_order)  # tasks are interleaved, not run one after another


def test_drop_last_false_keeps_every_example_once() -> None:
    sampler = TaskBatchSampler(TASKS, 4, drop_last=False, seed=1)
    batches = epoch_batches(sampler, 0)
    assert sorted(i for b in batches for i in b) == list(range(len(TASKS)))
    assert sorted(len(b) for b in batches) == [2, 3, 3] + [4] * 8  # tails of b (10), c (7), a (23)
    assert len(batches) == len(sampler)


def test_ratios_scale_each_tasks_share() -> None:
    sampler = TaskBatchSampler(TASKS, 1, ratios={"a": 0.5, "b": 2.0, "c": 0.0}, seed=0)
    counts = Counter(TASKS[b[0]] for b in epoch_batches(sampler, 0))
    assert counts == {"a": 12, "b": 20}  # round(0.5 * 23), 2 * 10, none
    halves = [{b[0] for b in epoch_batches(sampler, e) if TASKS[b[0]] == "a"} for e in range(2)]
    assert halves[0] != halves[1]  # a different half each epoch
    repeated = Counter(b[0] for b in epoch_batches(sampler, 0) if TASKS[b[0]] == "b")
    assert set(repeated.values()) == {2}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ratios": {"d": 1.0}}, "unknown task"), ({"ratios": {"a": -1.0}}, ">= 0"),
    ({"ratios": {"a": float("nan")}}, "finite"), ({"rank": 2, "world_size": 2}, "rank"),
    ({"batch_size": 0}, "batch_size"), ({"batch_size": 30}, "no batch"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    options = {"batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        TaskBatchSampler(TASKS, **options)


def test_shards_across_ranks_without_overlap() -> None:
    world = 3
    ranks = [TaskBatchSampler(TASKS, 2, seed=5, rank=r, world_size=world) for r in range(world)]
    per_rank = [epoch_batches(s, 2) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0]) == 3 + 1 + 1
    for step in zip(*per_rank, strict=True):
        assert len({TASKS[i] for b in step for i in b}) == 1  # every rank on the same task at each step
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat))
    whole = TaskBatchSampler(TASKS, 2 * world, seed=5)
    assert [sorted(i for b in step for i in b) for step in zip(*per_rank, strict=True)] == \
        [sorted(b) for b in epoch_batches(whole, 2)]  # rank slices tile the single-process global batches


def test_uneven_tail_is_split_across_ranks() -> None:
    tasks = ["a"] * 11
    ranks = [TaskBatchSampler(tasks, 2, drop_last=False, rank=r, world_size=2) for r in range(2)]
    per_rank = [epoch_batches(s, 0) for s in ranks]
    sizes = sorted(tuple(len(b) for b in step) for step in zip(*per_rank, strict=True))
    assert sizes == [(2, 1), (2, 2), (2, 2)]
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(11))


def test_works_as_dataloader_batch_sampler() -> None:
    data = torch.arange(len(TASKS)) * 10
    sampler = TaskBatchSampler(TASKS, 4, seed=0)
    batches = list(DataLoader(data, batch_sampler=sampler))
    assert len(batches) == len(sampler)
    assert all(len({TASKS[int(v) // 10] for v in b}) == 1 for b in batches)


def test_training_data_factory(tmp_path: Path) -> None:
    manifest = generate_benchmark(tmp_path, n_train=4, n_test=1, image_size=16)
    split = manifest["splits"]["train"]
    args = TrainArguments(model_path="unused", output_dir="unused", batch_size=4, num_negatives=2, seed=3,
                          task_mixing={"text": 0.5, "mscoco_t2i": 1.0})
    dataset, sampler = training_data(args, queries=tmp_path / split["queries"], pool=tmp_path / split["global_pool"],
                                     instructions=tmp_path / manifest["instructions"], image_root=tmp_path,
                                     text=tmp_path / manifest["text"]["train"]["queries"])
    assert len(dataset) == 8 * 4 + 4 and sampler.batches_per_task()["text"] == 0  # round(0.5 * 4) = 2 < 4
    batches = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=list))
    assert len(batches) == 8 and all(len({ex.task for ex in b}) == 1 and len(b[0].negatives) == 2 for b in batches)
    with pytest.raises(ValueError, match="M-BEIR queries and pool"):
        training_data(args, queries=tmp_path / split["queries"])
