"""The HDiT training loop behind `python -m hdit_train.train`: the `Trainer` (model, EMA, AdamW,
the RNG of σ, noise and condition dropout) and `fit`, which streams batches, logs, checkpoints
and samples. One loop for a CPU demo, one GPU (bf16 autocast, torch.compile) and many
(`torchrun`; DDP is set up only when WORLD_SIZE > 1).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from collection.storage import write_bytes
from hdit_train.data import (
    ShardStream,
    batches,
    data_hash,
    manifest_clip_spec,
    manifest_spec_hash,
    modality_gap,
    read_manifest,
)
from hdit_train.diffusion import TrainingLoss, rand_cosine_interpolated
from hdit_train.run import CKPT, STATE, build_model, load_config, save_checkpoint
from hdit_train.sampling import save_sample_grid
from models.clip import load_clip
from models.runtime import keep_freed_memory

log = logging.getLogger(__name__)


class Trainer:
    """Model, EMA copy, AdamW and the RNG that draws σ, noise and condition dropout."""

    def __init__(self, cfg: dict[str, Any], cond_dim: int = 0, device: str = "cpu"):
        self.cfg, self.device, self.step = cfg, torch.device(device), 0
        t = cfg["train"]
        torch.manual_seed(t["seed"])
        self.model = build_model(cfg, cond_dim).to(self.device)
        self.model.inner.gradient_checkpointing = bool(t["gradient_checkpointing"])
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(
            self.model.inner.param_groups(t["weight_decay"]),
            lr=t["lr"],
            betas=tuple(t["betas"]),
            eps=t["eps"],
            fused=True,
        )
        self.gen = torch.Generator(device=self.device).manual_seed(t["seed"] + 1)
        self.train_model = TrainingLoss(self.model)
        cuda = self.device.type == "cuda"
        self.autocast = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=cuda and bool(t["bf16"])
        )
        if cuda and t["compile"]:
            self.train_model = torch.compile(self.train_model)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.train_model = DistributedDataParallel(
                self.train_model, device_ids=[self.device] if cuda else None
            )

    def lr(self) -> float:
        """Linear warm-up to the peak rate, then constant."""
        t = self.cfg["train"]
        return t["lr"] * min(1.0, (self.step + 1) / max(1, t["warmup_steps"]))

    def _cond_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Model kwargs for a batch, with condition dropout (the CFG unconditional slot)."""
        kind, p = self.cfg["cond"]["kind"], self.cfg["cond"]["dropout"]
        n = batch["image"].shape[0]
        drop = torch.rand(n, generator=self.gen, device=self.device) < p
        if kind == "class":
            labels = batch["class"].to(self.device)
            return {"class_labels": labels.masked_fill(drop, self.model.inner.cfg.num_classes)}
        if kind == "clip":
            emb = batch["emb"].to(self.device).float()
            text_prob = self.cfg["cond"].get("text_prob", 0.0)
            if (
                text_prob and "txt_emb" in batch
            ):  # some samples conditioned on their caption instead
                use_text = torch.rand(n, generator=self.gen, device=self.device) < text_prob
                emb = torch.where(use_text[:, None], batch["txt_emb"].to(self.device).float(), emb)
            xi = self.cfg["cond"].get("noise", 0.0)
            if xi:  # LAFITE-style perturbation: robust to the text embeddings used at sampling
                eps = torch.randn(emb.shape, generator=self.gen, device=self.device)
                emb = emb + xi * eps / eps.norm(dim=1, keepdim=True) * emb.norm(dim=1, keepdim=True)
                emb = emb / emb.norm(dim=1, keepdim=True)
            return {"mapping_cond": emb * (~drop)[:, None]}
        return {}

    def train_step(self, batch: dict[str, Any]) -> float:
        """One optimiser step on a batch; returns the mean loss."""
        t, d = self.cfg["train"], self.cfg["diffusion"]
        x = batch["image"].to(self.device)
        cond = self._cond_inputs(batch)
        sigma = rand_cosine_interpolated(
            x.shape[0],
            x.shape[-1],
            d["noise_d_low"],
            None,
            d["sigma_data"],
            d["sigma_min"],
            d["sigma_max"],
            generator=self.gen,
            device=self.device,
        )
        noise = torch.randn(x.shape, generator=self.gen, device=self.device)
        for group in self.opt.param_groups:
            group["lr"] = self.lr()
        self.model.train()
        with self.autocast:
            loss = self.train_model(x, noise, sigma, cond).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if t["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t["grad_clip"])
        self.opt.step()
        self.step += 1
        self._update_ema()
        return float(loss.detach())

    def _update_ema(self) -> None:
        decay = min(self.cfg["train"]["ema_decay"], (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)
            for e, b in zip(self.ema.buffers(), self.model.buffers()):
                e.copy_(b)

    def state_tensors(self) -> dict[str, Any]:
        """Everything with tensors, flat, for safetensors."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for i, st in self.opt.state_dict()["state"].items():
            for name, v in st.items():
                out[f"opt.{i}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
        out["rng.gen"] = self.gen.get_state()
        out["rng.torch"] = torch.get_rng_state()
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def load_tensors(self, tensors: dict[str, Any]) -> None:
        """Inverse of state_tensors."""
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        opt_sd = self.opt.state_dict()
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v.to(self.device) if name != "step" else v
        opt_sd["state"] = state
        self.opt.load_state_dict(opt_sd)
        self.gen.set_state(tensors["rng.gen"])
        torch.set_rng_state(tensors["rng.torch"])


def _embed_missing(batch: dict[str, Any], encoder, captions: bool = False) -> None:
    """Fill batch['emb'] with CLIP image embeddings computed for samples that had none, and
    batch['txt_emb'] from the captions when `captions` (runs that also condition on text)."""
    if captions and "txt_emb" not in batch and "captions" in batch:
        batch["txt_emb"] = torch.from_numpy(
            encoder.encode_texts(batch["captions"]).astype(np.float32)
        )
    if "emb" in batch or "clip_pixels" not in batch:
        return
    todo = [i for i, px in enumerate(batch["clip_pixels"]) if px is not None]
    computed = encoder.encode_image_tensor(torch.stack([batch["clip_pixels"][i] for i in todo]))
    embs = list(batch["emb_partial"])
    for row, i in enumerate(todo):
        embs[i] = computed[row]
    batch["emb"] = torch.from_numpy(np.stack(embs).astype(np.float32))


def _dist_setup() -> tuple[int, int, str]:
    """(rank, world, device); initialises the process group only under
    torchrun with WORLD_SIZE>1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if world > 1:
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def fit(
    data: str,
    config: str,
    out: str,
    resume: bool = False,
    max_steps: int | None = None,
    max_minutes: float | None = None,
) -> Path:
    """Train (or resume) a run; returns the run folder."""
    cfg = load_config(config)
    run = Path(out)
    if resume:
        if not (run / STATE).exists():
            raise FileNotFoundError(f"--resume: no {STATE} in {run}")
        cfg = json.loads((run / STATE).read_text())["config"]
    if max_steps is not None:
        cfg["train"]["max_steps"] = max_steps
    if max_minutes is not None:
        cfg["train"]["max_minutes"] = max_minutes
    rank, world, device = _dist_setup()
    if device == "cpu":
        # large activations reuse freed memory instead of page-faulting
        keep_freed_memory(no_mmap=True)
    manifest = read_manifest(data)
    dhash = data_hash(data)
    encoder, cond_dim, clip_spec, clip_gap = None, 0, None, None
    if cfg["cond"]["kind"] == "clip":
        clip_spec = manifest_clip_spec(manifest) or cfg["cond"]["clip_spec"]
        encoder = load_clip(clip_spec, device=device)
        cond_dim = encoder.dim
        if cfg["cond"].get("text_shift", True) and not cfg["cond"].get("text_prob"):
            clip_gap = [round(float(v), 6) for v in modality_gap(data, encoder)]
    trainer = Trainer(cfg, cond_dim, device)
    consumed = 0
    if resume:
        state = json.loads((run / STATE).read_text())
        if state.get("data_hash") != dhash:
            log.warning(
                "resuming on different data: checkpoint hash %s, data hash %s",
                state.get("data_hash"),
                dhash,
            )
        trainer.load_tensors(load_file(str(run / CKPT), device="cpu"))
        trainer.step, consumed = state["step"], state.get("samples_consumed", 0)
        log.info("resumed %s at step %d", run, trainer.step)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        write_bytes(run / "config.yaml", yaml.safe_dump(cfg, sort_keys=False).encode())
    t = cfg["train"]
    stream = ShardStream(
        data,
        cfg["data"]["size"],
        cfg["cond"]["kind"],
        cfg["cond"]["class_field"],
        cfg["cond"]["classes"],
        encoder.preprocess if encoder else None,
        cfg["data"]["seed"],
        cfg["data"]["shuffle_buffer"],
        rank,
        world,
    )
    it = batches(stream.iterate(skip=consumed), t["batch_size"])
    extra = lambda: {
        "data_hash": dhash,
        "spec_hash": manifest_spec_hash(manifest),
        "clip_spec": clip_spec,  # noqa: E731
        "cond_dim": cond_dim,
        "clip_gap": clip_gap,
        "samples_consumed": stream.consumed,
        "manifest": manifest,
        "world_size": world,
    }
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log.info("model: %.2fM parameters; device %s; world %d", n_params / 1e6, device, world)
    start, deadline = (
        time.time(),
        (time.time() + 60 * t["max_minutes"]) if t["max_minutes"] else math.inf,
    )
    window, t_win = [], time.time()
    with open(run / "loss.jsonl", "a") if rank == 0 else open(os.devnull, "w") as loss_log:
        while trainer.step < t["max_steps"] and time.time() < deadline:
            batch = next(it)
            if encoder is not None:
                _embed_missing(batch, encoder, captions=bool(cfg["cond"].get("text_prob")))
            window.append(trainer.train_step(batch))
            s = trainer.step
            if s % t["log_every"] == 0 or s == t["max_steps"]:
                rate = len(window) * t["batch_size"] * world / (time.time() - t_win)
                row = {
                    "step": s,
                    "loss": sum(window) / len(window),
                    "lr": trainer.lr(),
                    "img_per_s": rate,
                    "elapsed_s": time.time() - start,
                }
                loss_log.write(json.dumps(row) + "\n")
                loss_log.flush()
                log.info("step %d loss %.4f %.1f img/s", s, row["loss"], rate)
                window, t_win = [], time.time()
            if rank == 0 and t["ckpt_every"] and s % t["ckpt_every"] == 0:
                save_checkpoint(
                    run, trainer.state_tensors(), {"step": trainer.step, "config": cfg, **extra()}
                )
            if rank == 0 and t["sample_every"] and s % t["sample_every"] == 0:
                save_sample_grid(
                    trainer.ema,
                    cfg,
                    encoder,
                    run / "samples" / f"step_{s:06d}.png",
                    device,
                    clip_gap,
                )
    if rank == 0:
        save_checkpoint(
            run, trainer.state_tensors(), {"step": trainer.step, "config": cfg, **extra()}
        )
        save_sample_grid(
            trainer.ema,
            cfg,
            encoder,
            run / "samples" / f"step_{trainer.step:06d}.png",
            device,
            clip_gap,
        )
    if stream.failed:
        log.warning("%d samples could not be decoded and were skipped", stream.failed)
    return run
