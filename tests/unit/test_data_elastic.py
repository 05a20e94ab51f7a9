"""Elastic data order (data.logical_shards): the rows of every global batch are the same on any
host count, and a run saved on one host count resumes on another with exactly the rows the
uninterrupted run would have read. Hosts are simulated in one process: host h's pipeline is
TextBatches(..., process_index=h, process_count=H), as on a pod, and its batches are placed as
rows [h x rows, (h + 1) x rows) of the global batch (the device loaders do so)."""

from __future__ import annotations

import json

import pytest
import torch

from data.config import DataConfig, SourceConfig
from data.holdout import Holdout
from data.pipeline import TextBatches, shard_layout
from data.tokenizers import ByteTokenizer
from torchprime.errors import ConfigError
from trainers.batch_hashes import row_hashes
from trainers.data_position import TrackedBatches

GLOBAL_ROWS = 8  # rows of a step's global batch (one micro-batch unless said)
STEPS = 9
SEED = 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A mixture: 24 text files (split by files) and 40 JSON lines in one file (split by
    documents), documents of 5 to 60 bytes."""
    root = tmp_path_factory.mktemp("elastic")
    (root / "txt").mkdir()
    for i in range(24):
        (root / "txt" / f"{i:02d}.txt").write_text(f"file {i}: " + "abc " * (i % 9 + 1))
    lines = [json.dumps({"text": f"line {i} " + "xy" * (i % 13)}) + "\n" for i in range(40)]
    (root / "lines.jsonl").write_text("".join(lines))
    return [
        SourceConfig(source="files", path=str(root / "txt"), weight=0.6),
        SourceConfig(source="files", path=str(root / "lines.jsonl"), format="json", weight=0.4),
    ]


def data_config(corpus, shards: int | None, **keys) -> DataConfig:
    defaults = {"block_size": 16, "packing": "document", "shuffle_buffer": 8, "max_doc_chars": 24}
    return DataConfig(sources=corpus, logical_shards=shards, **{**defaults, **keys})


#: training reads the side of the held-out split that evaluation does not
HOLDOUT = Holdout(0.1, held_out=False)


def hosts_of(cfg: DataConfig, hosts: int) -> list[TrackedBatches]:
    """Every host's pipeline (as the trainer wraps it), each with its rows of the batch."""
    rows = GLOBAL_ROWS // hosts
    return [
        TrackedBatches(TextBatches(cfg, ByteTokenizer(), rows, h, hosts, SEED, HOLDOUT))
        for h in range(hosts)
    ]


def global_hashes(hosts: list[TrackedBatches], steps: int) -> list[list[str]]:
    """The row hashes of the next `steps` global batches: each host's rows, in host order."""
    streams = [iter(h) for h in hosts]
    found = []
    for _ in range(steps):
        parts = [next(s) for s in streams]
        for h in hosts:
            h.mark_consumed()
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        found.append(row_hashes(batch))
    return found


def checkpoint_records(hosts: list[TrackedBatches], step: int) -> list[dict]:
    """What each host writes into a checkpoint (host_NNNNN.json), as read back from disk."""
    return [json.loads(json.dumps({"step": step, **h.state_dict()})) for h in hosts]


def resumed(cfg: DataConfig, hosts: int, saved: list[dict]) -> list[TrackedBatches]:
    """`hosts` new pipelines restored as trainers/checkpoint.py hands the records over: a
    host's own record (none for a host the saving run did not have) and every host's."""
    new = hosts_of(cfg, hosts)
    for h, tracked in enumerate(new):
        own = saved[h] if h < len(saved) else {"step": saved[0]["step"]}
        tracked.load_state_dict({**own, "batches_consumed": own["step"], "hosts": saved})
    return new


@pytest.mark.parametrize("shards", [4, None])  # None: one shard a row of the batch (8)
def test_the_global_batches_are_the_same_on_any_host_count(corpus, shards):
    cfg = data_config(corpus, shards)
    reference = global_hashes(hosts_of(cfg, 1), STEPS)
    for hosts in (2, 4):
        assert global_hashes(hosts_of(cfg, hosts), STEPS) == reference, f"{hosts} hosts"
    # distinct rows: the hashes compare real data
    assert len({h for batch in reference for h in batch}) > STEPS * GLOBAL_ROWS * 0.9


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_a_run_resumed_on_another_host_count_reads_the_uninterrupted_rows(corpus, before, after):
    cfg = data_config(corpus, 4)
    reference = global_hashes(hosts_of(cfg, 1), STEPS)
    k = 4
    first = hosts_of(cfg, before)
    assert global_hashes(first, k) == reference[:k]
    # the loaders read ahead: the checkpoint holds the position of the last batch trained on
    for h in first:
        next(iter(h))
    saved = checkpoint_records(first, k)
    assert global_hashes(resumed(cfg, after, saved), STEPS - k) == reference[k:]


def test_a_resume_with_a_larger_batch_continues_every_shard_where_it_stopped(corpus):
    # 4 shards: 2 rows each a batch of 8, then 4 rows each a batch of 16
    cfg = data_config(corpus, 4)
    reference = global_hashes(hosts_of(cfg, 1), 8)
    shard_rows = [[h for batch in reference for h in batch[2 * k : 2 * k + 2]] for k in range(4)]
    first = hosts_of(cfg, 2)
    global_hashes(first, 2)
    saved = checkpoint_records(first, 2)
    bigger = TextBatches(cfg, ByteTokenizer(), 16, 0, 1, SEED, HOLDOUT)
    bigger.load_state_dict([r["data"] for r in saved])
    for i in range(3):
        expected = [h for k in range(4) for h in shard_rows[k][4 + 4 * i : 8 + 4 * i]]
        assert row_hashes(next(bigger)) == expected, i


def test_a_host_reads_and_tokenizes_only_the_documents_of_its_own_shards(corpus):
    # pad packing: a row is one document, its text tells its file; 24 files over 4 shards,
    # shard s holding files s, s + 4, ...; host 1 of 2 owns shards 2 and 3
    cfg = data_config(corpus[:1], 4, packing="pad", max_doc_chars=0)
    host = TextBatches(cfg, ByteTokenizer(), 4, 1, 2, SEED)
    tok = ByteTokenizer()
    files = set()
    for _ in range(20):
        for row in next(host)["input_ids"].tolist():
            files.add(int(tok.decode(row).split(":")[0].removeprefix("file ")))
    assert {f % 4 for f in files} == {2, 3}
    assert len(files) == 12  # all of them, over several passes


def test_a_shards_rows_come_from_its_own_sources_documents_only(corpus):
    # the JSON source is one file: split by documents, shard s keeps lines s, s + 4, ...
    cfg = data_config(corpus[1:], 4, packing="pad", max_doc_chars=0, shuffle_buffer=0)
    host = TextBatches(cfg, ByteTokenizer(), 2, 3, 4, SEED)  # host 3 of 4: shard 3
    tok = ByteTokenizer()
    lines = {int(tok.decode(r).split()[1]) for _ in range(12) for r in next(host)["input_ids"]}
    assert lines == set(range(3, 40, 4))


@pytest.mark.parametrize(
    "shards, hosts, micro_batches, message",
    [
        (1, 2, 1, r"data.logical_shards=1 does not split over the 2 hosts: .* multiple of 2"),
        (6, 4, 1, r"data.logical_shards=6 does not split over the 4 hosts"),
        (4, 2, 4, r"=4 does not split over the 2 hosts x 4 micro-batches \(trainer.grad_accum"),
        (16, 2, 1, r"data.logical_shards=16: a global batch of 8 rows .* divisor of 8 that 2"),
        (3, 1, 1, r"data.logical_shards=3: a global batch of 8 rows"),
    ],
)
def test_a_shard_count_that_cannot_feed_the_batch_and_hosts_is_refused(
    shards, hosts, micro_batches, message
):
    with pytest.raises(ConfigError, match=message):
        shard_layout(shards, GLOBAL_ROWS, hosts, micro_batches)
    # null: a shard a row
    assert shard_layout(None, GLOBAL_ROWS, hosts, micro_batches) == (GLOBAL_ROWS, 1)


def test_the_rows_of_a_step_are_the_same_with_any_micro_batch_split(corpus):
    cfg = data_config(corpus, 4)
    reference = global_hashes(hosts_of(cfg, 1), 4)  # 4 steps of 8 rows, one micro-batch
    for micro_batches, hosts in [(2, 1), (2, 2), (4, 1)]:
        rows = GLOBAL_ROWS // hosts // micro_batches
        pipes = [
            TextBatches(cfg, ByteTokenizer(), rows, h, hosts, SEED, HOLDOUT, "data", micro_batches)
            for h in range(hosts)
        ]
        for step in range(4):
            found = []
            for _ in range(micro_batches):  # the hosts' rows of each micro-batch, in order
                parts = [next(p) for p in pipes]
                found += row_hashes({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
            assert found == reference[step], (micro_batches, hosts, step)


def test_a_position_saved_with_another_shard_count_is_refused_naming_the_key(corpus):
    saved = hosts_of(data_config(corpus, None), 1)[0]
    other = hosts_of(data_config(corpus, 4), 1)[0]
    with pytest.raises(ConfigError, match=r"saved with data.logical_shards=8, this run has 4; set"):
        other.load_state_dict({"batches_consumed": 0, "data": saved.state_dict()["data"]})


def version_1(state: dict, hosts: int = 1) -> dict:
    """A state as version 1 wrote it (one stream a host) from a one-shard version 2 state."""
    config = {k: v for k, v in state["config"].items() if k != "logical_shards"}
    shard = state["shards"]["0"]
    return {
        "version": 1,
        "config": {**config, "process_index": 0, "process_count": hosts},
        "batches": state["batches"],
        "epoch": state["epoch"],
        **shard,
    }


def test_a_single_host_version_1_position_resumes_exactly_as_one_logical_shard(corpus):
    cfg = data_config(corpus, 1)
    reference = TextBatches(cfg, ByteTokenizer(), GLOBAL_ROWS, seed=SEED)
    for _ in range(3):
        next(reference)
    old = json.loads(json.dumps(version_1(reference.state_dict())))
    expected = next(reference)["input_ids"]
    migrated = TextBatches(cfg, ByteTokenizer(), GLOBAL_ROWS, seed=SEED)
    migrated.load_state_dict(old)
    assert torch.equal(next(migrated)["input_ids"], expected)
    assert migrated.batches == 4
    sharded = TextBatches(data_config(corpus, None), ByteTokenizer(), GLOBAL_ROWS, seed=SEED)
    with pytest.raises(ConfigError, match=r"by one host; .* resume it with data.logical_shards=1"):
        sharded.load_state_dict(old)


def test_a_version_1_position_of_several_hosts_is_refused_with_what_to_do(corpus):
    one = TextBatches(data_config(corpus, 1), ByteTokenizer(), GLOBAL_ROWS, seed=SEED)
    old = version_1(one.state_dict(), hosts=2)
    with pytest.raises(ConfigError, match=r"by 2 hosts, .* Finish that run with the code"):
        one.load_state_dict(old)


def test_a_shard_left_without_documents_names_the_shard_and_the_key(tmp_path):
    # 2 documents in one file, split by documents over 4 shards: shards 2 and 3 get none
    (tmp_path / "two.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    cfg = DataConfig(source="files", path=str(tmp_path / "two.jsonl"), format="json")
    cfg.logical_shards = 4
    with pytest.raises(
        ConfigError,
        match=r"two.jsonl, logical shard 2 of 4 \(data.logical_shards\) gives no documents .* "
        r"lower data.logical_shards\)",
    ):
        TextBatches(cfg, ByteTokenizer(), 2, 1, 2, SEED)  # host 1 of 2: shards 2 and 3
    TextBatches(cfg, ByteTokenizer(), 2, 0, 2, SEED)  # host 0 reads shards 0 and 1: fine
