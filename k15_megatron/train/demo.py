"""``k15 demo [CONFIG] [overrides]``: the smallest end-to-end run of the foundation.

Until the RL loop lands this is the README's main job on its built-in tiny default
(``examples/tiny.yaml``). Every step is the real component:

1. build a random Hugging Face model from the config's ``model`` section and the character
   tokenizer (:mod:`k15_megatron.models.tiny`), saved as safetensors;
2. convert it to a Megatron distributed checkpoint under the configured TP/PP layout;
3. load it into Megatron-Core, train ``optim.train_iters`` steps (Megatron DDP + optimizer) on
   synthetic arithmetic text, logging the loss;
4. save the trained model as a k15 checkpoint and export it as a Hugging Face folder;
5. load the export in transformers and greedily complete an arithmetic prompt.

It re-launches itself under torchrun when the layout needs several processes.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch


def arithmetic_text(rng: random.Random, num_chars: int) -> str:
    """Lines like ``"37+5=42"`` until at least ``num_chars`` characters."""
    lines, size = [], 0
    while size < num_chars:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        line = f"{a}+{b}={a + b}\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)


def _batches(tokenizer, *, seq_length: int, micro_batch_size: int, num_micro_batches: int, seed: int):
    rng = random.Random(seed)
    batches = []
    for _ in range(num_micro_batches):
        rows = []
        for _ in range(micro_batch_size):
            ids = tokenizer.encode(arithmetic_text(rng, seq_length + 1))[: seq_length + 1]
            rows.append(torch.tensor(ids))
        tokens = torch.stack(rows)
        batches.append({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
                        "position_ids": torch.arange(seq_length).expand(micro_batch_size, -1)})
    return batches


def _log(msg: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def run(cfg) -> None:
    """Steps 1-4 of the module docstring on this rank (collective)."""
    from k15_megatron.checkpoint import dist_ckpt
    from k15_megatron.checkpoint.convert import hf_to_megatron
    from k15_megatron.checkpoint.hf_export import export_hf
    from k15_megatron.config import resolve_model_arch, save_resolved_config
    from k15_megatron.models.gpt import build_gpt_model, padded_vocab_size
    from k15_megatron.models.tiny import build_char_tokenizer, save_hf_model_from_arch
    from k15_megatron.parallel.initialize import initialize
    from k15_megatron.train.optimizer import build_training_objects
    from k15_megatron.train.step import train_step

    layout = initialize(cfg.parallel, seed=cfg.seed)
    arch = resolve_model_arch(cfg.model)
    run_dir = os.path.abspath(cfg.run_dir)
    hf_init, ckpt_init = os.path.join(run_dir, "hf_init"), os.path.join(run_dir, "ckpt_init")
    if layout.rank == 0:
        save_resolved_config(cfg, run_dir)
        save_hf_model_from_arch(arch, hf_init, seed=cfg.seed)
        _log(f"[1/5] random {arch.family} model ({arch.num_layers} layers, hidden {arch.hidden_size}) -> {hf_init}")
    torch.distributed.barrier()
    hf_to_megatron(hf_init, ckpt_init, tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline,
                   make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by)
    _log(f"[2/5] converted to a Megatron checkpoint (TP={layout.tp_size}, PP={layout.pp_size}) -> {ckpt_init}")

    padded = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, layout.tp_size)
    model = build_gpt_model(arch, parallel_cfg=cfg.parallel, precision_cfg=cfg.precision, padded_vocab=padded)
    dist_ckpt.load_model(model, ckpt_init)
    chunks, optimizer, scheduler = build_training_objects(model, optim_cfg=cfg.optim, precision_cfg=cfg.precision)
    tokenizer = build_char_tokenizer()
    num_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * layout.dp_size)
    for step in range(cfg.optim.train_iters):
        start = time.perf_counter()
        batches = _batches(tokenizer, seq_length=cfg.data.seq_length, micro_batch_size=cfg.data.micro_batch_size,
                           num_micro_batches=num_micro, seed=cfg.seed * 100003 + step * 101 + layout.dp_rank)
        metrics = train_step(chunks, optimizer, scheduler, batches)
        tokens = cfg.data.global_batch_size * cfg.data.seq_length
        _log(f"[3/5] step {step + 1}/{cfg.optim.train_iters} loss {metrics['loss']:.4f} "
             f"grad_norm {metrics['grad_norm']:.3f} lr {metrics['lr']:.2e} "
             f"{tokens / (time.perf_counter() - start):.0f} tokens/s")

    final_ckpt, final_hf = os.path.join(run_dir, "checkpoints", "final"), os.path.join(run_dir, "hf_final")
    dist_ckpt.save_model(model, final_ckpt, arch=arch, padded_vocab=padded, hf_assets_from=hf_init)
    export_hf(model, arch, final_hf, assets_dir=hf_init, dtype=torch.float32)
    _log(f"[4/5] saved {final_ckpt} and exported {final_hf}")


def _greedy_sample(hf_dir: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("12+34=")])
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="k15 demo", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="examples/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from k15_megatron.config import load_config
    from k15_megatron.parallel.launch import relaunch_under_torchrun

    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    world = cfg.parallel.world_size or cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context
    relaunch_under_torchrun(world)
    from k15_megatron.parallel.initialize import shutdown

    try:
        run(cfg)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        sample = _greedy_sample(os.path.join(os.path.abspath(cfg.run_dir), "hf_final"))
        print(f"[5/5] transformers greedy completion of '12+34=': {sample!r}", flush=True)
    return 0
