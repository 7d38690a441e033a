"""Training throughput of the default pretraining config (``configs/pretrain.yaml``) on this machine.

Times full optimizer steps (forward, backward, clip, AdamW) of the default model at the default
batch (16 x 256 bytes) after warm-up steps, through the same ``run_training`` loop as
``cl-arch pretrain`` (accelerate, one process). Prints a table and writes
``benchmarks/out/bench_train.json``.

    python benchmarks/bench_train.py [--steps 8] [--threads N]
"""
import argparse
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from cl_arch.io import write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "bench_train.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from cl_arch.train.config import PretrainRunConfig, load_config
    from cl_arch.train.pretrain import TrainingSetup, build_model, lm_loss, run_training

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in [("default (fp32)", []), ("default, activation checkpointing",
                                                       ["train.activation_checkpointing=true"])]:
            cfg = load_config(PretrainRunConfig, None, [
                "train.max_minutes=null", "train.eval_every=0", "train.val_blocks=16", "train.progress=false",
                "train.log_with=none", "data.max_train_bytes=2000000", f"train.output_dir={tmp}/{len(rows)}",
                f"train.max_steps={args.steps + 2}", *extra])
            times = []

            def loss_fn(model, block, _t=times):
                # Mark the start of every step's forward; the differences are whole steps.
                _t.append(time.perf_counter())
                return lm_loss(model, block)

            res = run_training(cfg, TrainingSetup(model=build_model(cfg), loss_fn=loss_fn, kind="bench"))
            # Median of whole-step times after 2 warm-up steps: robust to other jobs on a shared CPU.
            step_s = float(torch.tensor(times[2:]).diff().median())
            tokens = cfg.train.batch_size * cfg.data.seq_len
            rows.append({"config": label, "batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
                         "parameters": res["parameters"], "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s})
    info = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "load_avg_1m": os.getloadavg()[0],
            "timed_steps": args.steps, "rows": rows}
    print(f"training throughput, CPU, {info['threads']} threads, torch {torch.__version__}, "
          f"load average {info['load_avg_1m']:.1f}")
    print(f"{'config':36s} {'params':>8s} {'batch x T':>10s} {'ms/step':>9s} {'tokens/s':>9s}")
    for r in rows:
        print(f"{r['config']:36s} {r['parameters'] / 1e6:7.2f}M {r['batch']:>4d} x {r['seq_len']:<4d} "
              f"{r['step_ms']:9.0f} {r['tokens_per_s']:9.0f}")
    write_json(args.out, info)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
