"""Checkpoint folders: atomic, verified, pruned, and never unpickled without restriction."""
import hashlib
import json
import os
import pickle

import pytest
import torch

from llama_pt.train.checkpoint import (CheckpointError, SafeFileSystemReader, latest_valid_checkpoint,
                                       list_checkpoints, load_checkpoint, save_checkpoint)


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g).bfloat16()},
            "optim": {"w": {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(4, 3, generator=g)}}}


def _zeros_like(tree):
    return {k: _zeros_like(v) if isinstance(v, dict) else torch.zeros_like(v) for k, v in tree.items()}


def test_round_trip_and_keep_last(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, _tensors(step), {"step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    target = _zeros_like(_tensors(0))
    state = load_checkpoint(tmp_path / "step_00000040", target)
    assert state == {"step": 40}
    expected = _tensors(40)
    assert torch.equal(target["model"]["w"], expected["model"]["w"])
    assert torch.equal(target["model"]["b"], expected["model"]["b"])
    assert torch.equal(target["optim"]["w"]["exp_avg"], expected["optim"]["w"]["exp_avg"])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary folder left behind"


def test_corrupt_file_is_refused_before_anything_is_loaded(tmp_path):
    path = save_checkpoint(tmp_path, 1, _tensors(1), {"step": 1})
    shard = next(p for p in path.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    target = _zeros_like(_tensors(0))
    with pytest.raises(CheckpointError, match=f"{shard.name} does not match its checksum"):
        load_checkpoint(path, target)
    assert all(not t.any() for t in (target["model"]["w"], target["optim"]["w"]["exp_avg"]))


def test_partial_checkpoint_is_refused_and_skipped(tmp_path):
    save_checkpoint(tmp_path, 1, _tensors(1), {"step": 1})
    newest = save_checkpoint(tmp_path, 2, _tensors(2), {"step": 2})
    (newest / "MANIFEST.json").unlink()  # as if the writer died before finishing
    with pytest.raises(CheckpointError, match="incomplete: MANIFEST.json is missing"):
        load_checkpoint(newest, _zeros_like(_tensors(0)))
    messages = []
    assert latest_valid_checkpoint(tmp_path, log=messages.append).name == "step_00000001"
    assert "incomplete" in messages[0]


def test_extra_or_missing_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, _tensors(1), {"step": 1})
    (path / "stray.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="stray.bin"):
        load_checkpoint(path, _zeros_like(_tensors(0)))


def _reseal(path):
    """Rewrite MANIFEST.json to match the files, as an attacker who can write the folder would."""
    manifest = {f.name: {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                for f in sorted(path.iterdir()) if f.is_file() and f.name != "MANIFEST.json"}
    (path / "MANIFEST.json").write_text(json.dumps(manifest))


def _stack_global_call(module, name, arg):
    """A protocol-4 pickle that calls module.name(arg): STACK_GLOBAL resolves dotted names."""
    def text(s):
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b
    return (b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85" + b"R" + b".")


class _ShellPayload:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _payloads(marker):
    return {
        "dotted name through an allowed module": _stack_global_call(
            "torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}"),
        "dotted name through the metadata module": _stack_global_call(
            "torch.distributed.checkpoint.metadata", "os.system", f"touch {marker}"),
        "builtins.eval": _stack_global_call("builtins", "eval", f"open({str(marker)!r}, 'w').write('ran')"),
        "__reduce__ payload": pickle.dumps(_ShellPayload(f"touch {marker}")),
    }


@pytest.mark.parametrize("kind", ["dotted name through an allowed module", "dotted name through the metadata module",
                                  "builtins.eval", "__reduce__ payload"])
def test_crafted_metadata_is_refused_and_nothing_runs(tmp_path, kind):
    path = save_checkpoint(tmp_path, 1, _tensors(1), {"step": 1})
    marker = tmp_path / "payload_ran"
    (path / ".metadata").write_bytes(_payloads(marker)[kind])
    _reseal(path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, _zeros_like(_tensors(0)))
    message = str(err.value)
    assert "\n" not in message and str(path / ".metadata") in message and "not allowed" in message
    assert not marker.exists(), f"the {kind} ran"


def test_the_payloads_do_run_through_plain_pickle(tmp_path):
    """The crafted pickles above are live: an unrestricted unpickler executes every one of them."""
    for i, payload in enumerate(_payloads(tmp_path / "ran").values()):
        marker = tmp_path / "ran"
        pickle.loads(payload)
        assert marker.exists(), i
        marker.unlink()


def test_byte_entries_are_refused(tmp_path):
    """DCP stores non-tensor values as byte entries and reads them back with torch.load(weights_only=False):
    a checkpoint that declares one is refused before any data file is read."""
    marker = tmp_path / "payload_ran"
    path = save_checkpoint(tmp_path, 1, {"model": {"w": _ShellPayload(f"touch {marker}")}}, {"step": 1})
    _reseal(path)
    with pytest.raises(CheckpointError, match="BytesStorageMetadata, which is not allowed"):
        load_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    assert not marker.exists()


def test_garbage_metadata_is_one_line_naming_the_file(tmp_path):
    path = save_checkpoint(tmp_path, 1, _tensors(1), {"step": 1})
    (path / ".metadata").write_bytes(b"\x80\x04not a pickle")
    _reseal(path)
    with pytest.raises(CheckpointError, match=r"^checkpoint metadata .*\.metadata refused: [^\n]*$"):
        load_checkpoint(path, _zeros_like(_tensors(0)))
    (path / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    _reseal(path)
    with pytest.raises(CheckpointError, match="holds a dict, not DCP metadata"):
        SafeFileSystemReader(str(path)).read_metadata()


def test_trainer_state_is_plain_json(tmp_path):
    path = save_checkpoint(tmp_path, 3, _tensors(3), {"step": 3, "loader": {"consumed": 12}})
    assert json.loads((path / "trainer_state.json").read_text())["loader"] == {"consumed": 12}
