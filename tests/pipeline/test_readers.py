"""Readers on real text and on crafted bad records: every bad record counted by reason, no good one lost."""
import gzip
import json
import random
import re
import zlib
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from data_pipeline.compression import READ_CHUNK
from data_pipeline.readers import InputShard, make_reader
from realtext import english_texts


@pytest.fixture(scope="module")
def texts():
    return english_texts(60)


def _records(texts):
    return [{"id": f"r{i}", "text": t, "url": f"file://{i}"} for i, t in enumerate(texts)]


def _jsonl_bytes(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _read(fmt, path, **kwargs):
    reader = make_reader(fmt, "src", **kwargs)
    docs = []
    for shard in reader.list_shards([str(path)]):
        docs += list(reader.read(shard))
    return reader, docs


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_jsonl_round_trip(tmp_path, texts, suffix):
    records = _records(texts)
    data = _jsonl_bytes(records)
    if suffix == ".gz":
        data = gzip.compress(data)
    elif suffix == ".zst":  # two frames, as files concatenated with cat have
        half = len(records) // 2
        cctx = zstandard.ZstdCompressor()
        data = cctx.compress(_jsonl_bytes(records[:half])) + cctx.compress(_jsonl_bytes(records[half:]))
    path = tmp_path / f"docs.jsonl{suffix}"
    path.write_bytes(data)
    reader, docs = _read("jsonl", path)
    assert [d.id for d in docs] == [r["id"] for r in records]
    assert [d.text for d in docs] == texts
    assert all(d.source == "src" and d.metadata["url"] == f"file://{i}" for i, d in enumerate(docs))
    assert dict(reader.stats) == {"read": len(records)}


def test_jsonl_bad_records_counted_and_skipped(tmp_path, texts):
    good = _records(texts[:6])
    lines = [json.dumps(good[0]).encode(),
             b'{"id": "bad-utf8", "text": "caf\xe9 au lait"}',          # latin-1 byte
             json.dumps(good[1]).encode(),
             b'{"id": "bad-json", "text": "unterminated',                # malformed JSON
             b'[1, 2, 3]',                                              # JSON but not an object
             json.dumps({"id": "no-text", "body": texts[2]}).encode(),   # missing text
             json.dumps({"id": "num-text", "text": 42}).encode(),        # text not a string
             json.dumps(good[2]).encode(),
             b'{"id": "nul", "text": "a\x00b"}',                          # raw NUL byte
             json.dumps({"id": "nul-esc", "text": "a\u0000b"}).encode(),  # escaped NUL
             b'{"id": "surrogate", "text": "x\\ud800y"}',                # lone surrogate escape
             json.dumps({"id": "empty", "text": "  \n "}).encode(),
             json.dumps(good[3]).encode(),
             json.dumps({"id": "huge", "text": "word " * 10_000_000}).encode(),  # a 50 MB document
             json.dumps(good[4]).encode(),
             b"",
             json.dumps(good[5]).encode()]                               # last line without newline
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines))
    assert path.stat().st_size > 50_000_000
    reader, docs = _read("jsonl", path)
    assert [d.id for d in docs] == [r["id"] for r in good]
    assert [d.text for d in docs] == texts[:6]
    assert dict(reader.stats) == {"read": 6, "bad/invalid_utf8": 2, "bad/malformed_json": 2,
                                  "bad/missing_text": 1, "bad/text_not_string": 1, "bad/nul_bytes": 2,
                                  "bad/empty_text": 1,
                                  "bad/oversize": 1}


def test_max_doc_bytes_is_configurable(tmp_path, texts):
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl_bytes(_records(texts[:10])))
    limit = sorted(len(json.dumps(r).encode()) for r in _records(texts[:10]))[4]
    reader, docs = _read("jsonl", path, max_doc_bytes=limit)
    assert len(docs) == 5 and reader.stats["bad/oversize"] == 5
    assert all(len(json.dumps({"id": d.id, "text": d.text, "url": d.metadata["url"]}).encode()) <= limit
               for d in docs)


def _complete_lines(decompressed: bytes) -> int:
    return decompressed.count(b"\n")


@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_truncated_stream_keeps_every_record_before_the_cut(tmp_path, texts, codec):
    records = _records(texts * 3)
    data = _jsonl_bytes(records)
    packed = gzip.compress(data) if codec == "gz" else zstandard.ZstdCompressor().compress(data)
    cut = packed[: int(len(packed) * 0.6)]
    # What any decoder can recover from the cut bytes: the records before the cut, complete.
    if codec == "gz":
        recoverable = zlib.decompressobj(wbits=31).decompress(cut)
    else:
        recoverable = zstandard.ZstdDecompressor().decompressobj().decompress(cut)
    expected = _complete_lines(recoverable)
    assert 0 < expected < len(records)
    path = tmp_path / f"cut.jsonl.{codec}"
    path.write_bytes(cut)
    reader, docs = _read("jsonl", path)
    assert [d.id for d in docs] == [r["id"] for r in records[:expected]]
    assert [d.text for d in docs] == [r["text"] for r in records[:expected]]
    assert reader.stats["bad/truncated_file"] == 1
    assert reader.stats["read"] == expected


def test_corrupt_gzip_keeps_records_before_the_damage(tmp_path, texts):
    members = [gzip.compress(_jsonl_bytes(_records(texts[i:i + 10]))) for i in range(0, 30, 10)]
    damaged = members[0] + members[1] + b"\x1f\x8b\x08\x00garbage-not-deflate" + members[2]
    path = tmp_path / "damaged.jsonl.gz"
    path.write_bytes(damaged)
    reader, docs = _read("jsonl", path)
    assert [d.text for d in docs] == texts[:20]
    assert reader.stats["bad/corrupt_file"] == 1


def test_parquet_reader(tmp_path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"id": [f"p{i}" for i in range(len(texts))] + ["none", "huge"],
            "content": texts + [None, "x" * 2_000_000], "lang": ["en"] * (len(texts) + 2)}
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table(rows), path, row_group_size=7)
    reader, docs = _read("parquet", path, text_key="content", max_doc_bytes=1_000_000, batch_size=5)
    assert [d.text for d in docs] == texts
    assert docs[3].id == "p3" and docs[3].metadata == {"lang": "en"}
    assert dict(reader.stats) == {"read": len(texts), "bad/missing_text": 1, "bad/oversize": 1}

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    reader, docs = _read("parquet", broken)
    assert docs == [] and reader.stats["bad/corrupt_file"] == 1


def test_hf_saved_dataset_in_parts(tmp_path, texts):
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts[:23], "title": [f"t{i}" for i in range(23)]})
    ds.save_to_disk(str(tmp_path / "ds"))
    reader = make_reader("hf", "wiki")
    shards = reader.list_shards([str(tmp_path / "ds")], 3)
    assert shards == [InputShard(str(tmp_path / "ds"), i, 3) for i in range(3)]
    docs = [d for sh in shards for d in reader.read(sh)]
    assert [d.text for d in docs] == texts[:23]
    assert [d.id for d in docs] == [f"ds/{i}" for i in range(23)]
    assert docs[5].metadata == {"title": "t5"}


def _warc_record(rtype, body, uri=None, rid=None, length=None):
    head = [b"WARC/1.0", f"WARC-Type: {rtype}".encode()]
    if uri:
        head.append(f"WARC-Target-URI: {uri}".encode())
    head += [b"WARC-Date: 2019-08-17T10:00:00Z", f"WARC-Record-ID: <urn:uuid:{rid}>".encode(),
             b"Content-Type: text/plain", f"Content-Length: {len(body) if length is None else length}".encode()]
    return b"\r\n".join(head) + b"\r\n\r\n" + body + b"\r\n\r\n"


def test_wet_reader(tmp_path, texts):
    bodies = [t.encode("utf-8") for t in texts[:4]]
    limit = max(map(len, bodies))
    records = [_warc_record("warcinfo", b"software: test\r\nformat: WARC", rid="info"),
               _warc_record("conversion", bodies[0], "http://a.example/1", "id-1"),
               _warc_record("conversion", b"caf\xe9", "http://bad.example/", "id-bad"),
               _warc_record("conversion", bodies[1], "http://a.example/2", "id-2"),
               b"junk between records\r\n",
               _warc_record("conversion", bodies[2], "http://a.example/3", "id-3"),
               _warc_record("conversion", b"x" * (limit + 1), "http://big.example/", "id-big"),
               _warc_record("conversion", bodies[3], "http://a.example/4", "id-4")]
    # Common Crawl writes one gzip member per record.
    path = tmp_path / "CC-MAIN-test.warc.wet.gz"
    path.write_bytes(b"".join(gzip.compress(r) for r in records))
    reader, docs = _read("wet", path, max_doc_bytes=limit)
    assert [d.id for d in docs] == ["id-1", "id-2", "id-3", "id-4"]
    assert [d.text for d in docs] == [t.strip() for t in texts[:4]]
    assert docs[1].metadata["url"] == "http://a.example/2"
    assert docs[1].metadata["date"] == "2019-08-17T10:00:00Z"
    assert dict(reader.stats) == {"read": 4, "skipped/warcinfo": 1, "bad/invalid_utf8": 1,
                                  "bad/malformed_record": 1, "bad/oversize": 1}

    # A record whose Content-Length runs past the end of the file, and a cut gzip stream.
    short = b"".join(records[:2]) + _warc_record("conversion", bodies[1], "u", "id-x", length=10**6)
    (tmp_path / "short.wet").write_bytes(short)
    reader, docs = _read("wet", tmp_path / "short.wet")
    assert [d.id for d in docs] == ["id-1"] and reader.stats["bad/truncated_record"] == 1
    whole = gzip.compress(b"".join(records[:4]))
    for cut, kept in ((8, ["id-1", "id-2"]), (30, ["id-1"])):  # the gzip trailer; into the last body
        (tmp_path / "cut.wet.gz").write_bytes(whole[:-cut])
        reader, docs = _read("wet", tmp_path / "cut.wet.gz")
        assert [d.id for d in docs] == kept and reader.stats["bad/truncated_file"] == 1


def test_unknown_format_and_missing_input():
    with pytest.raises(ValueError, match="unknown input format 'csv'"):
        make_reader("csv", "x")
    with pytest.raises(FileNotFoundError, match="no input matches /nonexistent/"):
        make_reader("jsonl", "x").list_shards(["/nonexistent/*.jsonl"])


BOM = b"\xef\xbb\xbf"


def _zstd(data):
    return zstandard.ZstdCompressor().compress(data)


def _crlf(data):
    return data.replace(b"\n", b"\r\n")


def _gzip_member_of_one_read(data):
    """A gzip member of ``data`` exactly one 64 KiB read long (its header carries a long comment)."""
    member = bytearray(gzip.compress(data))
    member[3] |= 0x10  # FCOMMENT: a zero-terminated comment follows the 10-byte header
    comment = b"c" * (READ_CHUNK - len(member) - 1)
    return bytes(member[:10]) + comment + b"\x00" + bytes(member[10:])


def _junk_lines(junk):
    """The drops the JSONL reader counts for ``junk`` (random bytes): one per non-blank line."""
    lines = [line for line in junk.split(b"\n") if line.strip()]
    with_nul = sum(b"\x00" in line for line in lines)
    for line in lines:  # what the count below takes for granted
        if b"\x00" not in line:
            with pytest.raises(UnicodeDecodeError):
                line.decode("utf-8")
    return dict(+Counter({"bad/nul_bytes": with_nul, "bad/invalid_utf8": len(lines) - with_nul}))


def _awkward_jsonl_files(texts):
    """File name -> (bytes, the records that come out, the drops by reason); None for a UTF-16 file."""
    recs = _records(texts)
    rng = random.Random(20240611)
    junk, garbage = rng.randbytes(4096), rng.randbytes(512)
    long_frame = [{"id": f"cut-{i}", "text": t} for i, t in enumerate(texts * 3)]  # over one zstd block
    cut_frame = _zstd(_jsonl_bytes(long_frame))
    cut_frame = cut_frame[: len(cut_frame) * 6 // 10]
    after_cut = zstandard.ZstdDecompressor().decompressobj().decompress(cut_frame).count(b"\n")
    assert 0 < after_cut < len(long_frame)
    odd = [recs[45], {"id": "list", "text": ["a", "b"]}, recs[46], {"id": "number", "text": 42},
           {"id": "float", "text": 3.5}, recs[47]]
    utf16 = _jsonl_bytes(recs[48:51]).decode("utf-8")
    return {
        "bom.jsonl": (BOM + _jsonl_bytes(recs[0:3]), recs[0:3], {}),
        "crlf.jsonl": (_crlf(_jsonl_bytes(recs[3:6])), recs[3:6], {}),
        "bom_crlf.jsonl.gz": (gzip.compress(BOM + _crlf(_jsonl_bytes(recs[6:9]))), recs[6:9], {}),
        "plain_named.jsonl.gz": (_jsonl_bytes(recs[9:12]), recs[9:12], {}),
        "gzip_named.jsonl": (gzip.compress(_jsonl_bytes(recs[12:15])), recs[12:15], {}),
        "gzip_named.jsonl.zst": (gzip.compress(_jsonl_bytes(recs[15:18])), recs[15:18], {}),
        "zstd_named.jsonl.gz": (_zstd(BOM + _jsonl_bytes(recs[18:21])), recs[18:21], {}),
        "empty.jsonl": (b"", [], {}),
        "empty.jsonl.gz": (b"", [], {}),
        "empty.jsonl.zst": (b"", [], {}),
        "empty_member.jsonl.gz": (gzip.compress(b""), [], {}),
        "gzip_magic_only.jsonl.gz": (b"\x1f\x8b", [], {"bad/truncated_file": 1}),
        "bom_across_members.jsonl.gz": (_gzip_member_of_one_read(BOM[:1])
                                        + gzip.compress(BOM[1:] + _jsonl_bytes(recs[24:26])), recs[24:26], {}),
        "truncated.jsonl.zst": (_zstd(_jsonl_bytes(recs[21:24])) + cut_frame, recs[21:24] + long_frame[:after_cut],
                                {"bad/truncated_file": 1}),
        "random.jsonl": (_jsonl_bytes(recs[40:41]) + junk + b"\n" + _jsonl_bytes(recs[41:43]), recs[40:43],
                         _junk_lines(junk)),
        "garbage_after_member.jsonl.gz": (gzip.compress(_jsonl_bytes(recs[43:45])) + garbage, recs[43:45],
                                          {"bad/corrupt_file": 1}),
        "odd_text.jsonl": (_crlf(_jsonl_bytes(odd)), recs[45:48], {"bad/text_not_string": 3}),
        "utf16.jsonl": (utf16.encode("utf-16"), None, None),
        "utf16le_no_bom.jsonl": (utf16.encode("utf-16-le"), None, None),
        "utf16be.jsonl.gz": (gzip.compress("\ufeff".encode("utf-16-be") + utf16.encode("utf-16-be")), None, None),
    }


def test_awkward_files_lose_no_good_record(tmp_path, texts):
    cases = _awkward_jsonl_files(texts)
    for name, (data, _, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    shards = make_reader("jsonl", "src").list_shards([str(tmp_path / "*")])
    assert [Path(s.path).name for s in shards] == sorted(cases)
    out, drops = [], Counter()
    for shard in shards:  # one reader per shard, as each pipeline task has
        name = Path(shard.path).name
        _, kept, dropped = cases[name]
        reader = make_reader("jsonl", "src")
        if kept is None:
            with pytest.raises(ValueError) as err:
                list(reader.read(shard))
            assert str(err.value).startswith(f"{shard.path}: UTF-16 text") and "\n" not in str(err.value)
            continue
        docs = list(reader.read(shard))
        assert [(d.id, d.text) for d in docs] == [(r["id"], r["text"]) for r in kept], name
        assert dict(reader.stats) == {**({"read": len(kept)} if kept else {}), **dropped}, name
        out += docs
        drops += reader.stats
    every_good = [r for _, kept, _ in cases.values() if kept for r in kept]
    assert sorted(d.id for d in out) == sorted(r["id"] for r in every_good)
    assert not any(d.text.endswith("\r") for d in out)
    assert drops["bad/text_not_string"] == 3 and drops["bad/truncated_file"] == 2 and drops["bad/corrupt_file"] == 1
    assert "bad/malformed_json" not in drops  # the BOM'd first lines were read, not dropped


def test_awkward_wet_files(tmp_path, texts):
    bodies = [t.encode("utf-8") for t in texts[:8]]
    records = [_warc_record("conversion", body, f"http://a.example/{i}", f"id-{i}") for i, body in enumerate(bodies)]
    files = {"bom.warc.wet": BOM + records[0] + records[1],
             "plain_named.warc.wet.gz": records[2] + records[3],
             "gzip_named.warc.wet": gzip.compress(records[4]) + gzip.compress(records[5]),
             "zstd_named.warc.wet.gz": _zstd(BOM + records[6] + records[7]),
             "empty.warc.wet.gz": b"",
             "utf16.warc.wet": records[0].decode("utf-8").encode("utf-16")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    reader = make_reader("wet", "cc")
    docs = []
    for shard in reader.list_shards([str(tmp_path / "*.wet*")]):
        if shard.path.endswith("utf16.warc.wet"):
            with pytest.raises(ValueError, match=re.escape(f"{shard.path}: UTF-16 text (byte-order mark FF FE)")):
                list(reader.read(shard))
        else:
            docs += reader.read(shard)
    assert sorted((d.id, d.text) for d in docs) == sorted((f"id-{i}", t.strip()) for i, t in enumerate(texts[:8]))
    assert dict(reader.stats) == {"read": 8}


def test_text_inputs_skip_the_bom_and_refuse_utf16(tmp_path):
    from data_pipeline.tools.text_inputs import iter_documents_text

    (tmp_path / "ref.txt.gz").write_bytes(BOM + b"first line\r\n\r\nsecond line\r\n")  # plain, named .gz
    assert list(iter_documents_text([tmp_path / "ref.txt.gz"])) == ["first line", "second line"]
    (tmp_path / "ref16.txt").write_bytes("first line\nsecond line\n".encode("utf-16-le"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'ref16.txt'}: UTF-16 text (a NUL byte")):
        list(iter_documents_text([tmp_path / "ref16.txt"]))


def test_a_utf16_input_stops_its_task_by_name_and_a_rerun_after_converting_it_loses_nothing(tmp_path, texts):
    from data_pipeline.executor import LocalExecutor
    from data_pipeline.pipeline import SourceSpec, StepSpec, clean_tasks
    from data_pipeline.task import TaskError

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_bytes(_jsonl_bytes(_records(texts[:5])))
    (raw / "b.jsonl").write_bytes(_jsonl_bytes(_records(texts[5:9])).decode("utf-8").encode("utf-16"))
    src = SourceSpec("docs", "jsonl", (str(raw / "*.jsonl"),), steps=(StepSpec("normalize", "normalize"),))
    tasks = clean_tasks([src], tmp_path / "clean", tmp_path / "work", 0)
    with pytest.raises(TaskError) as err:
        LocalExecutor(workers=1, progress=False).run("clean", tasks)
    assert str(err.value).splitlines()[0] == (f"clean/docs/shard_00001: NotUtf8Error: {raw / 'b.jsonl'}: UTF-16 text "
                                              "(byte-order mark FF FE); inputs must be UTF-8: convert the file")
    assert tasks[0].marker.exists() and not tasks[1].marker.exists()
    (raw / "b.jsonl").write_bytes((raw / "b.jsonl").read_bytes().decode("utf-16").encode("utf-8"))
    stats = LocalExecutor(workers=1, progress=False).run("clean", tasks)
    assert [s["reader"] for s in stats] == [{"read": 5}, {"read": 4}]
