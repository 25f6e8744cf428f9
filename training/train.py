"""Train the shipped CLSA model on the PyTorch reference, with the paper's three stages.

  dense:  YOCO pretraining (SWA self-decoder, RNoPE cross path), LM loss
  warmup: backbone frozen, indexer only: KL(sg[mean dense cross attention] || softmax(I))
  joint:  top-k sparse attention in the forward pass, L_LM + 0.1 * L_KD

Each stage reads the previous stage's official checkpoint (checkpoint.pth + params.json) and
writes its own, so a run can be split over several GPU sessions. Within a stage, OUT/resume.pt
(weights, optimizer, step, time spent) is written every --save-every minutes: the same command
run again continues from it, and a stage already finished (OUT/train_STAGE.json) is skipped.

  python training/train.py --data DIR --out DIR --stage dense --minutes 5
"""

import argparse
import json
import math
import os
import pathlib
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from torch_ref.model import Model, ModelArgs, indexer_kd_loss, load_official, save_official  # noqa: E402
from training.data import W_ANSWER, Sampler, read_docs  # noqa: E402

# A 22M model (not shipped: 8 bits are slow on MLX's CPU); --override changes it
# (the shipped fp16 model: dim 256, hidden_dim 768, 4 heads; training/gpu_train.sh MODELS=small).
GPU_CONFIG = dict(
    model_type="clsa", dim=384, n_layers=10, hidden_dim=1024, n_self_heads=6, n_self_kv_heads=2,
    n_attn_heads=6, n_attn_kv_heads=2, vocab_size=8192, max_seq_len=131072, sliding_window=256,
    qk_norm=True, cross_rope=False, rope_style="standard", rope_theta=10000.0, norm_eps=1e-5,
    index_topk=256, index_head_dim=32,
)
STAGES = {  # lr, loss weights (lm, kd), sparse forward, trainable
    "dense": dict(lr=2e-3, lm=1.0, kd=0.0, sparse=False, only_indexer=False),
    "warmup": dict(lr=1e-3, lm=0.0, kd=1.0, sparse=False, only_indexer=True),
    "joint": dict(lr=2e-4, lm=1.0, kd=0.1, sparse=True, only_indexer=False),
}


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, data_dir, seq, batch, seed, text_share):
        self.data_dir, self.seq, self.batch, self.seed, self.text_share = data_dir, seq, batch, seed, text_share

    def __iter__(self):
        import sentencepiece as spm

        info = torch.utils.data.get_worker_info()
        sp = spm.SentencePieceProcessor(model_file=str(self.data_dir / "tokenizer.model"))
        docs = read_docs(self.data_dir / "docs.jsonl.xz", "train")
        sampler = Sampler(sp, docs, seed=self.seed * 1000 + (info.id if info else 0), fresh_mentions=True)
        while True:
            rows = [sampler.sequence(self.seq + 1, self.text_share) for _ in range(self.batch)]
            yield torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))


def lr_at(step, progress, peak, warmup):
    """Linear warm-up over `warmup` steps, then a cosine to a tenth of the peak as `progress` (the
    share of the step or time budget spent, 0 to 1) runs out."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def answer_accuracy(model, data_dir, length, n, sparse, dev, seed=1234):
    """Share of questions whose whole answer is the argmax under teacher forcing (= greedy)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tokenizer.model"))
    sampler = Sampler(sp, read_docs(data_dir / "docs.jsonl.xz", "heldout"), seed=seed)
    right = total = 0
    for _ in range(n):
        ids, _, answers, _ = sampler.chat_task(length)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            pred = model(torch.tensor([ids], device=dev), sparse=sparse)[0].argmax(-1).tolist()
        for start, a in answers:
            right += pred[start - 1:start - 1 + len(a)] == a
            total += 1
    return right / total


def save_resume(path, model, opt, step, elapsed, log):
    tmp = path.with_suffix(".partial")
    torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), step=step, elapsed=elapsed, log=log), tmp)
    os.replace(tmp, path)  # a run killed while saving keeps the previous one


def train(args, clock=time.time):
    """`clock`: the time source of the --minutes budget and the log (a test passes a fake one)."""
    if (args.out / f"train_{args.stage}.json").exists():
        print(f"{args.stage}: already trained -> {args.out}")
        return
    cfg = {**STAGES[args.stage], **({"lr": args.lr} if args.lr else {})}
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.init:
        model, margs = load_official(args.init, device="cpu")
        model = model.float()
    else:
        margs = ModelArgs(**{**GPU_CONFIG, **json.loads(args.override)})
        model = Model(margs)
    model.to(dev).train()
    params = [p for n, p in model.named_parameters() if not cfg["only_indexer"] or ".indexer." in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda")
    loader = torch.utils.data.DataLoader(Batches(args.data, args.seq, args.batch, args.seed, args.text_share), batch_size=None,
                                         num_workers=args.workers, prefetch_factor=4 if args.workers else None)
    it = iter(loader)
    log, t0, step = [], clock(), 0
    resume = args.out / "resume.pt"
    if resume.exists():
        state = torch.load(resume, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        log, step, t0 = state["log"], state["step"], t0 - state["elapsed"]
        print(f"{args.stage}: continuing from step {step}, {state['elapsed']:.0f}s spent", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    budget, saved = args.minutes * 60, clock()
    while True:
        if clock() - saved > args.save_every * 60:
            save_resume(resume, model, opt, step, clock() - t0, log)
            saved = clock()
        elapsed = clock() - t0
        if (args.steps and step >= args.steps) or (not args.steps and elapsed > budget):
            break
        # By time, not by a step count guessed from the first steps: those include the start-up
        # (CUDA, workers), which once ended the cosine at a third of the run.
        progress = step / args.steps if args.steps else elapsed / budget
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress, cfg["lr"], args.warmup)
        ids, w = next(it)
        ids, w = ids.to(dev, non_blocking=True).long(), w.to(dev, non_blocking=True)
        x, y, w = ids[:, :-1], ids[:, 1:], w[:, 1:]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            need_aux = cfg["kd"] > 0
            out = model(x, sparse=cfg["sparse"], return_aux=need_aux)
            logits, aux = out if need_aux else (out, None)
        loss = torch.zeros((), device=dev)
        if cfg["lm"]:
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(w)
            lm = (ce * w).sum() / w.sum()
            loss = loss + cfg["lm"] * lm
        if cfg["kd"]:
            kd = indexer_kd_loss(aux["index_scores"], aux["abar"])
            loss = loss + cfg["kd"] * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0:
            with torch.no_grad():
                answer = w == W_ANSWER
                acc = ((logits.argmax(-1) == y) & answer).sum() / answer.sum().clamp(min=1)
            row = dict(step=step, seconds=round(clock() - t0, 3), loss=round(loss.item(), 4),
                       answer_token_acc=round(acc.item(), 4), lr=opt.param_groups[0]["lr"])
            if cfg["kd"]:
                row["kd"] = round(kd.item(), 4)
            log.append(row)
            print(json.dumps(row), flush=True)
        step += 1
    model.eval()
    evals = {}
    for length in args.eval_lengths:
        for sparse in ([False, True] if margs.index_topk else [False]):
            acc = answer_accuracy(model, args.data, length, args.eval_samples, sparse, dev)
            evals[f"{'clsa' if sparse else 'dense'}@{length}"] = acc
            print(f"retrieval {'clsa' if sparse else 'dense'} @ {length}: {acc:.3f}", flush=True)
    model.cpu()
    save_official(model, margs, args.out)
    tokens = step * args.batch * args.seq
    (args.out / f"train_{args.stage}.json").write_text(json.dumps(
        dict(stage=args.stage, steps=step, tokens=tokens, seq=args.seq, batch=args.batch, seconds=clock() - t0,
             device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
             config=asdict(margs), stage_config=cfg, retrieval=evals, log=log), indent=1))
    resume.unlink(missing_ok=True)
    print(f"{args.stage}: {step} steps, {tokens / 1e6:.1f}M tokens in {clock() - t0:.0f}s -> {args.out}")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=pathlib.Path, required=True, help="training/prepare.py's folder")
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--init", type=pathlib.Path, help="official checkpoint folder to start from")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=0, help="fixed step count instead of --minutes")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.0, help="peak learning rate instead of the stage's")
    p.add_argument("--text-share", type=float, default=0.15, help="share of plain-text samples (the rest: chat tasks)")
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=float, default=4.0, help="minutes between OUT/resume.pt saves")
    p.add_argument("--override", default="{}", help="JSON of config changes for experiments")
    p.add_argument("--eval-lengths", type=int, nargs="*", default=[], help="retrieval check after training")
    p.add_argument("--eval-samples", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main():
    train(parser().parse_args())


if __name__ == "__main__":
    main()
