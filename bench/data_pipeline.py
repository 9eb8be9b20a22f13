"""Data pipeline throughput: `ithaca prep` MB/s and the loader's tokens/s per process, against
what one training process consumes.

What it measures, in one run on one machine:
- prep: MB of input text per second with 1 tokenizer process and with --prep-workers N (ratio N:1);
- loader: tokens/s that one training process gets from the PackedLoader, pulling the config's
  micro-batches back to back, read in the process (data.workers=0) and by one worker process;
- training: tokens/s of one process training the config (real DeepSpeed steps, median after a
  warm-up), and the ratio loader/training: how many times faster the data arrives than training
  eats it (> 1: the data feed is not the bottleneck; with a worker it also runs beside training).

Run:  python -m ithaca.bench.data_pipeline --device cpu
      python -m ithaca.bench.data_pipeline --device cuda --config llama-1b-32k --input DIR --tokenizer tokenizer.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def _train_bpe(files: list[Path], out: Path) -> str:
    """A 4096-token byte-level BPE trained on the input: a realistic tokenizer cost without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"])
    tok.train([str(f) for f in files if f.suffix != ".gz"], trainer)
    tok.save(str(out))
    return str(out)


def _prep_rate(files: list[Path], tokenizer_spec: str, workers: int, out: Path) -> tuple[float, int]:
    """(MB of input per second, shard count)."""
    from ithaca.data import load_tokenizer, prep

    start = time.perf_counter()
    manifest = prep(files, out, load_tokenizer(tokenizer_spec), shard_tokens=1 << 20, workers=workers)
    seconds = time.perf_counter() - start
    return sum(f.stat().st_size for f in files) / seconds / 1e6, len(manifest.shards)


def _loader_rate(cfg, data: Path, workers: int, steps: int) -> float:
    """Tokens per second one dp rank's loader delivers."""
    from ithaca.data import PackedLoader, Source

    loader = PackedLoader([Source(data)], seq_len=cfg.data.seq_len, micro_batch=cfg.train.micro_batch,
                          grad_accum=cfg.grad_accum_steps, dp=1, dp_rank=0, workers=workers)
    loader.next_step()  # starts the worker and reads the first shard
    start = time.perf_counter()
    for _ in range(steps):
        loader.next_step()
    seconds = time.perf_counter() - start
    loader.close()
    return steps * cfg.train.global_batch * cfg.data.seq_len / seconds


def _training_rate(config: str, data: Path, steps: int, out: Path) -> tuple[float, object]:
    """(tokens/s of one training process, its config), median over the steps after two warm-up steps."""
    from ithaca.bench.rendezvous import free_port
    from ithaca.data import read_manifest
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.train.loop import run_training

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    vocab = -(-read_manifest(data).tokenizer["vocab_size"] // 64) * 64  # the tokenizer's ids, padded as configs do
    cfg = load_config(config, [f"data.path={data}", f"model.vocab_size={max(vocab, load_config(config).model.vocab_size)}",
                               "parallel.dp=1", "parallel.tp=1", "parallel.sp=1",
                               f"train.steps={steps + 2}", f"train.output_dir={out}", "train.log_every=1000",
                               f"checkpoint.dir={out / 'ckpt'}", "checkpoint.every=100000"])
    records = run_training(cfg)
    return statistics.median(r.tokens / r.seconds for r in records[2:]), cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", default="debug-cpu", help="the training config whose step is the yardstick")
    parser.add_argument("--input", nargs="+", type=Path, help="text/JSONL to prep (default: the standard library)")
    parser.add_argument("--tokenizer", default="bpe",
                        help="'bpe' (a 4096-token BPE trained on the input first), 'byte', or a tokenizer.json")
    parser.add_argument("--prep-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=10, help="training steps timed (loader: 20x as many)")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    from ithaca.data.inputs import default_inputs, expand_inputs

    files = expand_inputs(args.input) if args.input else default_inputs()
    from ithaca.bench.header import bench_header  # imports torch: after CUDA_VISIBLE_DEVICES is set above

    print(bench_header("data_pipeline", args.device, f"config={args.config} tokenizer={args.tokenizer} "
                       f"input={sum(f.stat().st_size for f in files) / 1e6:.1f} MB in {len(files)} files"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = _train_bpe(files, tmp / "bpe.json") if args.tokenizer == "bpe" else args.tokenizer
        one, shards = _prep_rate(files, tokenizer, 1, tmp / "prep1")
        many, _ = _prep_rate(files, tokenizer, args.prep_workers, tmp / "prepN")
        print("\n| stage | setting | rate | ratio |\n|---|---|---|---|")
        print(f"| prep | 1 process | {one:.1f} MB/s | 1.00 |")
        print(f"| prep | {args.prep_workers} processes | {many:.1f} MB/s | {many / one:.2f} |")
        train, cfg = _training_rate(args.config, tmp / "prep1", args.steps, tmp / "train")
        print(f"| training | 1 process, {args.config} (seq_len={cfg.data.seq_len}, global_batch="
              f"{cfg.train.global_batch}) | {train:,.0f} tok/s | 1.00 |")
        for workers in (0, 1):
            rate = _loader_rate(cfg, tmp / "prep1", workers, 20 * args.steps)
            where = "in the training process" if workers == 0 else "1 worker process"
            print(f"| loader | {where} | {rate:,.0f} tok/s | {rate / train:.1f} x training |")
        print(f"\n({shards} shards of 1 Mi tokens)")


if __name__ == "__main__":
    main()
