"""The data-parallel loader: the same global order for any DP size and worker count; state is a counter."""
import itertools
import multiprocessing
import os
import pickle
import signal
import time
import zlib

import numpy as np
import pytest
import torch

from llama_pt.data import BlendedSamples, IndexedDatasetWriter, MicroBatchLoader, PackedSource
from llama_pt.model import ConfigError

SEQ = 8
B = 8  # global batch, sequences


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    sources = []
    for name, n_docs in (("web", 30), ("code", 12), ("books", 3)):
        prefix = root / name
        with IndexedDatasetWriter(prefix, 512) as w:
            for k in rng.integers(1, 40, size=n_docs):
                w.add_document(np.append(rng.integers(3, 512, size=int(k)), 2))
        sources.append(PackedSource(name, [prefix], SEQ, seed=11))
    return BlendedSamples(sources, [0.6, 0.3, 0.1], block_size=64)


def take(loader, steps):
    return list(itertools.islice(iter(loader), steps))


def global_steps(samples, dp_size, micro, workers, steps, start=0):
    """Per step, the concatenation over ranks (in rank order) of all their micro-batches."""
    per_rank = [take(MicroBatchLoader(samples, B, micro, r, dp_size, start, workers), steps)
                for r in range(dp_size)]
    return [torch.cat([mb for rank in per_rank for mb in rank[s]]) for s in range(steps)]


def test_micro_batch_shapes_and_rank_slices(samples):
    loader = MicroBatchLoader(samples, B, micro_batch=2, dp_rank=1, dp_size=2)
    steps = take(loader, 2)
    assert loader.state_dict() == {"consumed_samples": 2 * B}
    for s, step in enumerate(steps):
        assert len(step) == B // (2 * 2)
        assert all(mb.dtype == torch.int64 and mb.shape == (2, SEQ + 1) for mb in step)
        expected = np.stack([samples[g] for g in range(s * B + B // 2, s * B + B)])  # rank 1's half
        assert torch.equal(torch.cat(step), torch.from_numpy(expected))


@pytest.mark.parametrize("dp_size,micro,workers", [(1, 1, 0), (1, 4, 0), (2, 2, 0), (4, 1, 0), (4, 2, 0),
                                                    (1, 2, 2), (2, 1, 2)])
def test_global_order_is_independent_of_dp_size_and_workers(samples, dp_size, micro, workers):
    steps = 12  # 96 samples: crosses a blend block (64) and an epoch of "books"
    reference = [torch.from_numpy(np.stack([samples[g] for g in range(s * B, (s + 1) * B)])) for s in range(steps)]
    got = global_steps(samples, dp_size, micro, workers, steps)
    for s in range(steps):
        assert torch.equal(got[s], reference[s])


def test_order_crosses_epochs_and_is_a_pure_function_of_the_index(samples):
    books = samples.sources[2]
    g = next(g for g in range(10_000) if samples.locate(g) == ("books", 2 * books.windows_per_epoch + 1))
    fresh = BlendedSamples([PackedSource(s.name, s.prefixes, SEQ, seed=11) for s in samples.sources],
                           [0.6, 0.3, 0.1], block_size=64)
    assert np.array_equal(fresh[g], samples[g])  # read first, with nothing read before it
    assert np.array_equal(fresh[g], books[2 * books.windows_per_epoch + 1])


def test_resume_from_counter_continues_exactly(samples):
    full = take(MicroBatchLoader(samples, B, 2, num_workers=0), 6)
    first = MicroBatchLoader(samples, B, 2)
    take(first, 2)
    state = first.state_dict()
    assert state == {"consumed_samples": 2 * B}
    for workers in (0, 2):
        resumed = MicroBatchLoader(samples, B, 2, num_workers=workers)
        resumed.load_state_dict(state)
        rest = take(resumed, 4)
        assert all(torch.equal(torch.cat(a), torch.cat(b)) for a, b in zip(rest, full[2:]))
        assert resumed.state_dict() == {"consumed_samples": 6 * B}
    # resuming into a different DP layout continues the same global order
    got = global_steps(samples, 2, 1, 0, 4, start=state["consumed_samples"])
    assert all(torch.equal(g, torch.cat(f)) for g, f in zip(got, full[2:]))


def test_bad_loader_settings_name_the_field(samples):
    with pytest.raises(ConfigError, match=r"global_batch=8 is not divisible by micro_batch=3 x dp_size=1"):
        MicroBatchLoader(samples, 8, 3)
    with pytest.raises(ConfigError, match=r"global_batch=8 is not divisible by micro_batch=1 x dp_size=3"):
        MicroBatchLoader(samples, 8, 1, dp_size=3)
    with pytest.raises(ConfigError, match=r"dp_rank=2 must be in \[0, dp_size=2\)"):
        MicroBatchLoader(samples, 8, 1, dp_rank=2, dp_size=2)
    with pytest.raises(ConfigError, match=r"micro_batch=0 must be positive"):
        MicroBatchLoader(samples, 8, 0)
    loader = MicroBatchLoader(samples, 8, 1)
    with pytest.raises(ValueError, match=r"consumed_samples=-8"):
        loader.load_state_dict({"consumed_samples": -8})
    with pytest.raises(ValueError, match=r"consumed_samples=None"):
        loader.load_state_dict({"step": 3})


# ---- the epoch tables: memory-mapped files built once, shared by every process -------------------------

IDX_SEQ, IDX_SEED = 4, 5


def write_source(root, lengths_per_shard, start=3):
    """Shards whose documents have the given lengths (tokens count up from `start`); returns the prefixes."""
    prefixes, nxt = [], start
    for s, lengths in enumerate(lengths_per_shard):
        prefixes.append(root / f"shard{s}")
        with IndexedDatasetWriter(prefixes[-1], 1000) as w:
            for n in lengths:
                w.add_document(np.arange(nxt, nxt + n) % 1000)
                nxt += n
    return prefixes


def expected_tables(seed, name, epoch, lengths, seq_len):
    """The documented rule, written out: one permutation per generator [seed, crc32(name), epoch, purpose]."""
    crc = zlib.crc32(name.encode("utf-8"))
    doc_order = np.random.default_rng([seed, crc, epoch, 0]).permutation(len(lengths))
    offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths)[doc_order])])
    windows = (sum(lengths) - 1) // seq_len
    window_order = np.random.default_rng([seed, crc, epoch, 1]).permutation(windows)
    return doc_order, offsets, window_order


LENGTHS = [[5, 1, 9, 3], [12, 4, 7, 2, 6, 8, 11]]
FLAT = [n for shard in LENGTHS for n in shard]


def assert_tables(src, epoch, lengths=FLAT):
    got = src.epoch_tables(epoch)
    for g, e, dtype in zip(got, expected_tables(IDX_SEED, src.name, epoch, lengths, IDX_SEQ),
                           (np.int32, np.int64, np.int32)):
        assert g.dtype == dtype and not g.flags.writeable
        assert np.array_equal(g, e)


def epoch_folders(index_dir):
    return sorted(p.name for p in index_dir.glob("*/*"))


def test_epoch_tables_are_memory_mapped_files_equal_to_the_documented_rule(tmp_path):
    index_dir = tmp_path / "index"
    src = PackedSource("web", write_source(tmp_path, LENGTHS), IDX_SEQ, seed=IDX_SEED, index_dir=index_dir)
    for epoch in (0, 1, 7):
        assert_tables(src, epoch)
    assert epoch_folders(index_dir) == ["epoch_000000", "epoch_000000.lock", "epoch_000001", "epoch_000001.lock",
                                        "epoch_000007", "epoch_000007.lock"]
    folder = next(index_dir.glob("web-*/epoch_000001"))
    assert sorted(p.name for p in folder.iterdir()) == ["doc_offsets.npy", "doc_order.npy", "window_order.npy"]
    assert np.array_equal(np.load(folder / "doc_order.npy", allow_pickle=False), src.epoch_tables(1)[0])


def test_a_second_source_and_a_pickled_one_reuse_the_files(tmp_path):
    index_dir = tmp_path / "index"
    prefixes = write_source(tmp_path, LENGTHS)
    src = PackedSource("web", prefixes, IDX_SEQ, seed=IDX_SEED, index_dir=index_dir)
    assert src.build_epochs(range(2)) == 2 and src.build_epochs(range(3)) == 1
    files = {p: p.stat().st_mtime_ns for p in index_dir.rglob("*.npy")}
    assert len(files) == 9
    again = PackedSource("web", prefixes, IDX_SEQ, seed=IDX_SEED, index_dir=index_dir)
    assert again.build_epochs(range(3)) == 0
    w = again.windows_per_epoch
    assert all(np.array_equal(again[j], src[j]) for j in range(3 * w))
    blob = pickle.dumps(src)  # what a loader worker receives: paths, no tables
    assert len(blob) < 4096
    clone = pickle.loads(blob)
    assert not clone._tables and np.array_equal(clone[w + 1], src[w + 1])
    assert {p: p.stat().st_mtime_ns for p in index_dir.rglob("*.npy")} == files


def _build_then_hang(prefixes, index_dir, started):
    """Builds epoch 0 but never publishes it: stuck in the first fsync until killed."""
    def hang(fd):
        started.set()
        time.sleep(600)
    os.fsync = hang
    PackedSource("web", prefixes, IDX_SEQ, seed=IDX_SEED, index_dir=index_dir).epoch_tables(0)


def test_a_killed_build_is_never_read_and_is_rebuilt(tmp_path):
    index_dir = tmp_path / "index"
    prefixes = write_source(tmp_path, LENGTHS)
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    builder = ctx.Process(target=_build_then_hang, args=(prefixes, index_dir, started))
    builder.start()
    assert started.wait(60)
    os.kill(builder.pid, signal.SIGKILL)
    builder.join()
    leftovers = list(index_dir.glob("web-*/.epoch_000000.tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "doc_order.npy").is_file()
    np.save(leftovers[0] / "doc_order.npy", np.zeros(len(FLAT), np.int32))  # a wrong table is not read either
    src = PackedSource("web", prefixes, IDX_SEQ, seed=IDX_SEED, index_dir=index_dir)
    assert src.build_epochs([0]) == 1
    assert_tables(src, 0)
    assert epoch_folders(index_dir) == ["epoch_000000", "epoch_000000.lock"]


def test_a_changed_shard_gets_new_tables(tmp_path):
    index_dir = tmp_path / "index"
    prefixes = write_source(tmp_path, LENGTHS)
    old = PackedSource("web", prefixes, IDX_SEQ, seed=IDX_SEED, index_dir=index_dir)
    assert_tables(old, 0)
    changed = [[5, 1, 9, 3], [12, 4, 7, 2, 6, 8, 10, 1]]  # same token count, other documents
    write_source(tmp_path, changed)
    new = PackedSource("web", prefixes, IDX_SEQ, seed=IDX_SEED, index_dir=index_dir)
    assert new.index_key != old.index_key and new.num_tokens == old.num_tokens
    assert_tables(new, 0, [n for shard in changed for n in shard])
    st = os.stat(f"{prefixes[0]}.idx")  # the same bytes, touched: a new key too
    os.utime(f"{prefixes[0]}.idx", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert PackedSource("web", prefixes, IDX_SEQ, seed=IDX_SEED, index_dir=index_dir).index_key != new.index_key
    keys = {PackedSource(name, prefixes, seq, seed=seed, index_dir=index_dir).index_key
            for name, seq, seed in (("web", 4, 5), ("web2", 4, 5), ("web", 5, 5), ("web", 4, 6))}
    assert len(keys) == 4


def _race(prefixes, index_dir, barrier, results):
    real_fsync = os.fsync
    os.fsync = lambda fd: (time.sleep(0.2), real_fsync(fd))  # hold the lock long enough to be contended
    src = PackedSource("web", prefixes, IDX_SEQ, seed=IDX_SEED, index_dir=index_dir)
    computed, write = [], src._write_epoch
    src._write_epoch = lambda epoch, folder: (computed.append(epoch), write(epoch, folder))
    barrier.wait()
    built = src.build_epochs([0])
    results.put((built, len(computed), [t.tobytes() for t in src.epoch_tables(0)]))


def test_processes_racing_for_one_epoch_build_it_once(tmp_path):
    index_dir = tmp_path / "index"
    prefixes = write_source(tmp_path, LENGTHS)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(prefixes, index_dir, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(built for built, _, _ in got) == [0, 0, 1]
    assert sum(computed for _, computed, _ in got) == 1  # the others waited for the lock, then read
    expected = [t.astype(d).tobytes() for t, d in zip(expected_tables(IDX_SEED, "web", 0, FLAT, IDX_SEQ),
                                                        (np.int32, np.int64, np.int32))]
    assert all(tables == expected for _, _, tables in got)
    assert epoch_folders(index_dir) == ["epoch_000000", "epoch_000000.lock"]


def test_loader_workers_share_tables_built_on_demand(tmp_path):
    index_dir = tmp_path / "index"
    src = PackedSource("web", write_source(tmp_path, LENGTHS), IDX_SEQ, seed=IDX_SEED, index_dir=index_dir)
    samples = BlendedSamples([src], [1.0], block_size=4)
    w = src.windows_per_epoch
    steps = -(-3 * w // 4)  # three epochs, read by two workers
    got = torch.cat([torch.cat(s) for s in take(MicroBatchLoader(samples, 4, 1, num_workers=2), steps)])
    assert torch.equal(got, torch.from_numpy(np.stack([src[j] for j in range(4 * steps)])))
    folders = epoch_folders(index_dir)  # the workers read ahead: maybe an epoch more
    assert {"epoch_000000", "epoch_000001", "epoch_000002"} <= set(folders)
    assert not [f for f in folders if ".tmp" in f]
