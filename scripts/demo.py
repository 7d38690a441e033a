"""``cl-arch demo``: train a tiny plastic transformer on the standard library for about a minute.

Prints the training loss and validation bits/byte as they fall. (The evaluation
suite replaces this with the frozen-vs-adapted demo once it lands.)
"""
import math
import time

import torch
from tqdm import tqdm

from cl_arch import PlasticConfig, PlasticTransformer
from cl_arch.train.data import bytes_to_tensor, random_windows, read_bytes, split_files, stdlib_files


def add_parser(sub):
    p = sub.add_parser("demo", help="train a tiny model on the stdlib source for about a minute")
    p.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-bytes", type=int, default=4_000_000, help="bytes of stdlib source to read")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


@torch.no_grad()
def bits_per_byte(model, data, seq_len, batches=8, batch_size=16, seed=1234):
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(batches):
        x, y = random_windows(data, batch_size, seq_len, gen)
        logits, _ = model(x, return_state=False)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    model.train()
    return total / batches / math.log(2)


def run(args):
    torch.manual_seed(args.seed)
    train_files, val_files = split_files(stdlib_files("train"))
    train = bytes_to_tensor(read_bytes(train_files, args.max_bytes))
    val = bytes_to_tensor(read_bytes(val_files, args.max_bytes // 10))
    model = PlasticTransformer(PlasticConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, layers {model.config.layer_types}; "
          f"corpus: {train.numel() / 1e6:.1f} MB train, {val.numel() / 1e6:.2f} MB validation")
    print(f"step 0: validation {bits_per_byte(model, val, args.seq_len):.3f} bits/byte")
    gen = torch.Generator().manual_seed(args.seed)
    start, step, ema = time.time(), 0, None
    bar = tqdm(total=int(args.seconds), unit="s", desc="training")
    while time.time() - start < args.seconds:
        x, y = random_windows(train, args.batch_size, args.seq_len, gen)
        logits, _ = model(x, return_state=False)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        bar.n = min(int(time.time() - start), int(args.seconds))
        bar.set_postfix(step=step, loss=f"{ema:.3f}")
        if step % 25 == 0:
            tqdm.write(f"step {step}: train loss {ema:.3f} nats/byte ({ema / math.log(2):.3f} bits/byte)")
    bar.close()
    print(f"step {step}: validation {bits_per_byte(model, val, args.seq_len):.3f} bits/byte")
    return 0
