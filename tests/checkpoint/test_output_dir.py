"""No command that writes a model folder loses a user's file.

`tools/convert_hf_to_megatron.py`, `tools/convert_megatron_to_hf.py` and `k15 export` refuse an
existing non-empty output folder (exit status 2, one message naming the folder and --overwrite,
before any process starts, the folder untouched); with --overwrite they replace their own files
and older weight files only, keep the user's other files, and say what they wrote. The unit
tests pin the publish order (marker last) and the staging folder's clean-up. The export back to
Hugging Face runs with 2 ranks (the refusal comes before torchrun starts them; rank 0 publishes
what both wrote).
"""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tooling import run_tool

from k15_megatron.checkpoint import output_dir
from k15_megatron.checkpoint.safetensors_io import HFTensorReader

NOTES = "my notes, not a model file\n"


def _folder_with_user_files(path, *, stale_weights: bool):
    path.mkdir()
    (path / "notes.txt").write_text(NOTES)
    if stale_weights:  # an older model a loader would read instead of the new shards
        save_file({"old": torch.zeros(3)}, str(path / "model.safetensors"))
        (path / "config.json").write_text('{"old": true}')
    return sorted(os.listdir(path))


def _refused(proc, folder, before):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(folder) in lines[0] and "--overwrite" in lines[0], proc.stderr[-2000:]
    assert sorted(os.listdir(folder)) == before and (folder / "notes.txt").read_text() == NOTES
    assert not os.path.exists(output_dir.staging_path(str(folder)))


def _same_tensors(hf_dir, exported):
    original, reader = HFTensorReader(hf_dir), HFTensorReader(str(exported))
    assert reader.names() == original.names()
    for name in original.names():
        assert torch.equal(reader.get(name), original.get(name)), name


@pytest.mark.distributed
def test_conversion_tools_and_export_refuse_a_used_folder_and_overwrite_only_their_files(tiny_hf_dirs, tmp_path):
    hf = tiny_hf_dirs["qwen2"]
    ckpt = tmp_path / "ckpt"
    before = _folder_with_user_files(ckpt, stale_weights=False)
    convert = ("tools/convert_hf_to_megatron.py", "--hf", hf, "--out", str(ckpt))
    _refused(run_tool(*convert), ckpt, before)
    proc = run_tool(*convert, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ckpt / "notes.txt").read_text() == NOTES and (ckpt / "k15_meta.json").exists()
    assert "wrote 7 files (.metadata, " in proc.stdout and str(ckpt) in proc.stdout, proc.stdout

    commands = {"convert_megatron_to_hf": ("tools/convert_megatron_to_hf.py", "--tp", "2", "--ckpt", str(ckpt), "--out"),
                "export": ("-m", "k15_megatron.cli", "export", str(ckpt))}
    for name, command in commands.items():
        out = tmp_path / f"hf_{name}"
        before = _folder_with_user_files(out, stale_weights=True)
        _refused(run_tool(*command, str(out)), out, before)
        assert list(load_file(str(out / "model.safetensors"))) == ["old"]
        proc = run_tool(*command, str(out), "--overwrite")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "notes.txt").read_text() == NOTES
        assert not (out / "model.safetensors").exists()  # the stale weights went, not the notes
        _same_tensors(hf, out)
        written = sorted(set(os.listdir(out)) - {"notes.txt"})
        assert f"{name}: wrote {len(written)} files (" in proc.stdout and str(out) in proc.stdout, proc.stdout
        assert not os.path.exists(output_dir.staging_path(str(out)))


def test_publish_into_a_new_folder_is_one_rename(tmp_path):
    final = tmp_path / "new"
    staging = output_dir.make_staging_dir(str(final))
    for name in ("a.safetensors", "model.safetensors.index.json"):
        (tmp_path / staging / name).write_text(name)
    names = output_dir.publish(staging, str(final), marker="model.safetensors.index.json")
    assert names == ["a.safetensors", "model.safetensors.index.json"] == sorted(os.listdir(final))
    assert not os.path.exists(staging)


def test_publish_with_overwrite_keeps_foreign_files_and_moves_the_marker_last(tmp_path, monkeypatch):
    final = tmp_path / "used"
    final.mkdir()
    for name, text in (("notes.txt", NOTES), ("model.safetensors", "old"), ("config.json", "old"),
                       ("model.safetensors.index.json", "old"), ("tokenizer.json", "old")):
        (final / name).write_text(text)
    staging = output_dir.make_staging_dir(str(final))
    for name in ("model-pp000-00001.safetensors", "config.json", "model.safetensors.index.json"):
        (tmp_path / staging / name).write_text("new")
    moves = []
    real_replace = os.replace
    monkeypatch.setattr(output_dir.os, "replace", lambda a, b: (moves.append(os.path.basename(b)), real_replace(a, b)))
    output_dir.publish(staging, str(final), marker="model.safetensors.index.json", owned=output_dir.HF_OWNED)
    assert moves[-1] == "model.safetensors.index.json"
    assert sorted(os.listdir(final)) == ["config.json", "model-pp000-00001.safetensors",
                                         "model.safetensors.index.json", "notes.txt", "tokenizer.json"]
    assert (final / "notes.txt").read_text() == NOTES and (final / "tokenizer.json").read_text() == "old"
    assert (final / "config.json").read_text() == "new"


def test_check_refuses_files_inputs_and_used_folders_and_a_crash_leftover_is_cleared(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        output_dir.check_output_dir(str(tmp_path / "file"), overwrite=True)
    with pytest.raises(ValueError, match="is the input"):
        output_dir.check_output_dir(str(tmp_path), overwrite=True, inputs=[str(tmp_path) + "/"])
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text(NOTES)
    with pytest.raises(ValueError, match="--overwrite"):
        output_dir.check_output_dir(str(used), overwrite=False)
    output_dir.check_output_dir(str(used), overwrite=True)
    output_dir.check_output_dir(str(tmp_path / "empty_or_new"), overwrite=False)
    leftover = output_dir.staging_path(str(used))
    os.makedirs(leftover)
    (tmp_path / leftover / "half.safetensors").write_text("crashed")
    assert os.listdir(output_dir.make_staging_dir(str(used))) == []
