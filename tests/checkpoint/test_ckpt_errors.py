"""Conversion refuses bad input with a message that names the culprit."""

import json
import os
import shutil

import pytest
from tooling import REPO_ROOT, run_tool
from safetensors.torch import load_file, save_file


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_is_named(tiny_hf_dirs, tmp_path):
    hf = _copy(tiny_hf_dirs["qwen2"], tmp_path / "gpt2ish")
    config = json.load(open(hf / "config.json"))
    config["model_type"] = "gpt2"
    json.dump(config, open(hf / "config.json", "w"))
    proc = run_tool("tools/convert_hf_to_megatron.py", "--hf", str(hf), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "gpt2" in proc.stderr and "config.json" in proc.stderr and "qwen2" in proc.stderr
    assert not os.path.exists(tmp_path / "out")


def test_shapes_that_do_not_match_the_config_are_named(tiny_hf_dirs, tmp_path):
    hf = _copy(tiny_hf_dirs["qwen3"], tmp_path / "bad_shapes")
    config = json.load(open(hf / "config.json"))
    config["intermediate_size"] = 320  # weights were saved with 256
    json.dump(config, open(hf / "config.json", "w"))
    proc = run_tool("tools/convert_hf_to_megatron.py", "--hf", str(hf), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "mlp.gate_proj.weight" in proc.stderr and "linear_fc1" in proc.stderr
    assert not os.path.exists(tmp_path / "out"), "a failed conversion must not leave a checkpoint"


def test_missing_tensor_is_named(tiny_hf_dirs, tmp_path):
    hf = _copy(tiny_hf_dirs["qwen3"], tmp_path / "missing")
    tensors = load_file(hf / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    proc = run_tool("tools/convert_hf_to_megatron.py", "--hf", str(hf), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "model.layers.1.self_attn.k_norm.weight" in proc.stderr and "missing" in proc.stderr


def test_export_of_a_non_checkpoint_is_refused(tiny_hf_dirs, tmp_path):
    proc = run_tool("tools/convert_megatron_to_hf.py", "--ckpt", tiny_hf_dirs["qwen2"], "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "not a k15 checkpoint" in proc.stderr and tiny_hf_dirs["qwen2"] in proc.stderr


def test_init_from_a_checkpoint_of_another_architecture_names_every_difference(tmp_path):
    """Shapes can agree while the model differs (rope_theta): the saved config.json decides."""
    import dataclasses
    import json

    from k15_megatron.config.hf_config import hf_config_dict
    from k15_megatron.checkpoint.model_init import check_same_architecture
    from k15_megatron.config import load_config, resolve_model_arch

    arch = resolve_model_arch(load_config(os.path.join(REPO_ROOT, "examples", "tiny_arith.yaml"), []).model)
    (tmp_path / "hf_assets").mkdir()
    (tmp_path / "hf_assets" / "config.json").write_text(json.dumps(hf_config_dict(arch)))
    check_same_architecture(str(tmp_path), arch)  # the same architecture passes
    other = dataclasses.replace(arch, rope_theta=10000.0, norm_epsilon=1e-5)
    with pytest.raises(ValueError) as err:
        check_same_architecture(str(tmp_path), other)
    message = str(err.value)
    assert "model.rope_theta=10000.0 here, 1000000.0 in the checkpoint" in message
    assert "model.norm_epsilon" in message and str(tmp_path / "hf_assets" / "config.json") in message
    check_same_architecture(str(tmp_path / "hf_assets"), other)  # no hf_assets below: nothing to compare


def _refused_once(proc, *fragments):
    """Exit 2, each fragment in stderr, the message printed once, no traceback from any launcher."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("error:") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]])
def test_unsupported_architecture_with_several_ranks_is_named_once_before_any_worker(tiny_hf_dirs, tmp_path,
                                                                                      layout):
    hf = _copy(tiny_hf_dirs["qwen2"], tmp_path / "gpt2ish")
    config = json.load(open(hf / "config.json"))
    config["model_type"] = "gpt2"
    json.dump(config, open(hf / "config.json", "w"))
    proc = run_tool("tools/convert_hf_to_megatron.py", "--hf", str(hf), "--out", str(tmp_path / "out"), *layout)
    _refused_once(proc, "gpt2", "qwen2")
    assert "torch.distributed.run" not in proc.stderr and not os.path.exists(tmp_path / "out")


def test_missing_folder_and_bad_layouts_are_named_once(tiny_hf_dirs, tmp_path):
    missing = str(tmp_path / "nowhere")
    _refused_once(run_tool("tools/convert_hf_to_megatron.py", "--hf", missing, "--out", str(tmp_path / "o"),
                           "--tp", "2"), missing, "no such folder")
    hf = tiny_hf_dirs["qwen2"]
    heads = json.load(open(os.path.join(hf, "config.json")))["num_attention_heads"]
    bad_tp = heads + 1  # never divides the heads
    _refused_once(run_tool("tools/convert_hf_to_megatron.py", "--hf", hf, "--out", str(tmp_path / "o"),
                           "--tp", str(bad_tp)), f"--tp={bad_tp}", "config.json")
    _refused_once(run_tool("tools/convert_hf_to_megatron.py", "--hf", hf, "--out", str(tmp_path / "o"),
                           "--tp", "0"), "--tp=0")
    _refused_once(run_tool("tools/convert_hf_to_megatron.py", "--hf", hf, "--out", str(tmp_path / "o"),
                           "--pp", "7"), "--pp=7")
    assert not os.path.exists(tmp_path / "o")


def test_export_of_a_non_checkpoint_with_several_ranks_is_named_once(tiny_hf_dirs, tmp_path):
    proc = run_tool("tools/convert_megatron_to_hf.py", "--ckpt", tiny_hf_dirs["qwen2"], "--out", str(tmp_path / "o"),
                    "--tp", "2")
    _refused_once(proc, "not a k15 checkpoint", tiny_hf_dirs["qwen2"])
