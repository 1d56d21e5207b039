"""CUDA checks: embeddings, the embed job, neighborhood attention and HDiT training on a GPU.

Every test here is marked `gpu` and skipped unless CUDA is available, so the CPU suite and CI
skip the whole file. On a GPU box (`bash scripts/gpu_check.sh` runs it with the wheels and
the carried sieve-tiny):

    SIEVE_CACHE=.cache/sieve python -m pytest -q -m gpu tests/test_gpu.py

`SIEVE_GPU_TEST_DEVICE=cpu` runs the same checks with "cpu" as the device under test, to
dry-run the file's logic on a machine without a GPU (slow; every comparison is then cpu vs
cpu). Thresholds are for the GPU.

- `models.clip.Clip` (the one encoder: the embed worker's, search's, the server's) on the
  device: bf16 within 0.995 mean cosine of fp32 for sieve-tiny and seeded random ViT-B-32;
  channels_last, compile and trim_text within 0.999 of fp32 eager; the device's fp32 within
  0.999 of the CPU's; uint8 batches normalised on the device as CPU-normalised ones.
- `pipelines.embed.embed` on the default GPU cluster (workers sharing the GPU, each with a
  decode pool, uint8 batches) vs on CPU:
  same rows, statuses and parts, embeddings within 0.999 (fp32) / 0.99 (bf16) mean cosine.
- `na2d_torch` vs brute force, values and gradients, fp32 and bf16, square, non-square and
  non-divisible grids (strided, gather and dense paths); natten vs na2d_torch when natten is
  installed; an HDiT training step under bf16 autocast, eager and torch.compile (as
  `hdit_train.train` runs on a GPU).
- FAISS GPU vs CPU flat search when faiss has GPUs.
Order: cheap checks first, the torch.compile ones last, so a time cap loses the least.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

DEVICE = os.environ.get("SIEVE_GPU_TEST_DEVICE", "cuda")
_AVAILABLE = torch.cuda.is_available() if DEVICE.startswith("cuda") else True

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _AVAILABLE, reason="needs CUDA (SIEVE_GPU_TEST_DEVICE=cpu dry-runs the checks on CPU)"
    ),
]

VITB32 = "ViT-B-32"
N_IMAGES = 48  # samples per encoder check (one batch)


# ---- helpers ------------------------------------------------------------------------------
def _rows_cos(a, b) -> tuple[float, float]:
    """(mean, min) per-row cosine of two (n, d) arrays or tensors."""
    a = (
        torch.as_tensor(np.asarray(a, dtype=np.float32))
        if not torch.is_tensor(a)
        else a.detach().float().cpu()
    )
    b = (
        torch.as_tensor(np.asarray(b, dtype=np.float32))
        if not torch.is_tensor(b)
        else b.detach().float().cpu()
    )
    assert a.shape == b.shape, (a.shape, b.shape)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float(cos.mean()), float(cos.min())


def _has_c_compiler() -> bool:
    """torch.compile (inductor/triton) builds small C helpers against Python.h at first use."""
    import sysconfig

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return bool(cc) and os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))


def _need_compiler() -> None:
    import importlib.util

    if not _has_c_compiler():
        pytest.skip("torch.compile needs a C compiler (cc/gcc) and Python.h on this machine")
    if DEVICE.startswith("cuda") and importlib.util.find_spec("triton") is None:
        pytest.skip("torch.compile on CUDA needs triton, which is not installed")


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def tiny_ready():
    """sieve-tiny (today's recipe) must already be in the cache ($SIEVE_CACHE, else ~/.cache/sieve):
    training it here would take minutes."""
    from models.cache import BUNDLED
    from models.specs import TINY_NAME

    tiny = BUNDLED[TINY_NAME]
    if not tiny.ready():
        pytest.fail(
            f"sieve-tiny is not trained in {tiny.folder} (carry .cache/sieve and set SIEVE_CACHE, "
            "or run `python -m models.train sieve-tiny` first)"
        )
    return tiny.folder


@pytest.fixture(scope="module")
def samples():
    from models.scenes import iter_samples

    return list(iter_samples(N_IMAGES, size=64, seed=123, start=50_000))


@pytest.fixture(scope="module")
def vitb32_ckpt(tmp_path_factory) -> str:
    """open_clip ViT-B-32 with seeded random weights, saved once:
    every loader gets the same model."""
    import open_clip

    path = tmp_path_factory.mktemp("vitb32") / "ViT-B-32-random-seed0.pt"
    torch.manual_seed(0)
    torch.save(open_clip.create_model(VITB32).state_dict(), path)
    return f"open_clip:{VITB32}/{path}"


def _model_inputs(spec: str, samples):
    """(cpu fp32 Clip, preprocessed image batch, token ids) for a CLIP spec."""
    from models.clip import load_clip

    clip = load_clip(spec, device="cpu")
    images = torch.stack([clip.preprocess(s.image) for s in samples])
    tokens = clip.tokenizer([s.caption for s in samples])
    return clip, images, tokens


@pytest.fixture(scope="module", params=["sieve-tiny", VITB32])
def clip_case(request, samples):
    if request.param == "sieve-tiny":
        request.getfixturevalue("tiny_ready")
        spec = "sieve-tiny"
    else:
        spec = request.getfixturevalue("vitb32_ckpt")
    clip, images, tokens = _model_inputs(spec, samples)
    return request.param, spec, clip, images, tokens


# ---- neighborhood attention and HDiT on the device (first: cheap, no model loads) ----------
# (h, w, kernel, tile, d_head): dense, strided (divisible) and gather (non-divisible) paths
NA_CASES = [
    (16, 16, 7, None, 32),
    (24, 24, 7, 8, 32),
    (32, 40, 5, 8, 16),
    (20, 13, 5, 4, 8),
    (30, 17, 7, 6, 32),
    (64, 48, 7, None, 64),  # auto tile on a large non-square grid
]


def _qkv(h, w, d, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [
        torch.randn(2, 4, h, w, d, generator=g).to(DEVICE, dtype).requires_grad_(True)
        for _ in range(3)
    ]


@pytest.mark.parametrize("h,w,k,tile,d", NA_CASES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_na2d_torch_matches_brute_force_on_device(h, w, k, tile, d, dtype):
    from hdit_train.neighborhood import brute_force_na2d, na2d_torch

    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    q, key, v = _qkv(h, w, d, dt, seed=h * w + k)
    scale = d**-0.5
    ours = na2d_torch(q, key, v, k, scale=scale, tile=tile)
    assert ours.dtype == dt and ours.device.type == torch.device(DEVICE).type
    # reference in fp32 on the same (rounded) inputs
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, key, v))
    ref = brute_force_na2d(q32, k32, v32, k, scale=scale)
    g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    g_ours = torch.autograd.grad(ours, (q, key, v), g.to(dt))
    g_ref = torch.autograd.grad(ref, (q32, k32, v32), g)
    atol = 1e-4 if dtype == "fp32" else 3e-2
    torch.testing.assert_close(ours.float(), ref, atol=atol, rtol=atol)
    for name, a, b in zip("qkv", g_ours, g_ref):
        assert torch.isfinite(a).all(), name
        scale_b = b.abs().max().item()
        err = (a.float() - b).abs().max().item()
        assert err <= atol * max(1.0, scale_b), (name, dtype, err, scale_b)


@pytest.mark.parametrize("h,w,k", [(16, 16, 7), (20, 13, 5), (32, 32, 7)])
def test_natten_matches_na2d_torch_when_installed(h, w, k):
    from hdit_train import neighborhood

    if neighborhood._natten_na2d is None:
        pytest.skip("natten is not installed (the PyTorch path is used)")
    if not DEVICE.startswith("cuda"):
        pytest.skip("natten is used on CUDA only")
    for dt, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        q, key, v = _qkv(h, w, 32, dt, seed=3)
        ours = neighborhood.na2d(q, key, v, k, scale=0.3)
        ref = neighborhood.na2d_torch(q, key, v, k, scale=0.3)
        torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)
        g = torch.randn_like(ref)
        for a, b in zip(
            torch.autograd.grad(ours, (q, key, v), g), torch.autograd.grad(ref, (q, key, v), g)
        ):
            torch.testing.assert_close(a.float(), b.float(), atol=tol * 10, rtol=tol * 10)


HDIT_MODEL = {
    "patch_size": 4,
    "levels": [
        {
            "depth": 1,
            "width": 64,
            "d_ff": 128,
            "attn": "neighborhood",
            "d_head": 32,
            "kernel_size": 7,
        },
        {"depth": 1, "width": 128, "d_ff": 256, "attn": "global", "d_head": 32},
    ],
    "mapping": {"depth": 1, "width": 64, "d_ff": 128},
}


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised layers weights, so the loss and every
    gradient depend on them all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.05)


def test_hdit_training_step_under_bf16_autocast():
    """Forward + backward of the denoiser's loss on the device:
    matches the CPU in fp32, close under bf16."""
    from hdit_train.diffusion import Denoiser
    from hdit_train.model import HDiT, HDiTConfig

    torch.manual_seed(0)
    cpu_model = Denoiser(HDiT(HDiTConfig.from_dict({**HDIT_MODEL, "mapping_cond_dim": 16})))
    _randomize(cpu_model)
    model = copy.deepcopy(cpu_model).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    # 128x96 px -> 32x24 tokens: the gather path (tile 6) of na2d_torch, forward and backward
    x = torch.rand(4, 3, 128, 96, generator=g) * 2 - 1
    noise = torch.randn(x.shape, generator=g)
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0])
    cond = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)

    def step(m, dev, bf16):
        m.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=bf16):
            loss = m.loss(x.to(dev), noise.to(dev), sigma.to(dev), mapping_cond=cond.to(dev)).mean()
        loss.backward()
        grads = {
            n: p.grad.detach().float().cpu() for n, p in m.named_parameters() if p.grad is not None
        }
        return float(loss.detach()), grads

    loss_cpu, grads_cpu = step(cpu_model, "cpu", False)
    loss_dev, grads_dev = step(model, DEVICE, False)
    loss_bf16, grads_bf16 = step(model, DEVICE, True)
    assert np.isfinite([loss_cpu, loss_dev, loss_bf16]).all()
    assert (
        set(grads_bf16)
        == set(grads_cpu)
        == {n for n, p in cpu_model.named_parameters() if p.requires_grad}
    )
    assert abs(loss_dev - loss_cpu) <= 5e-3 * abs(loss_cpu), (loss_dev, loss_cpu)
    assert abs(loss_bf16 - loss_cpu) <= 5e-2 * abs(loss_cpu), (loss_bf16, loss_cpu)
    flat = lambda gs: torch.cat([gs[n].flatten() for n in sorted(gs)])  # noqa: E731
    g_cpu, g_dev, g_bf16 = flat(grads_cpu), flat(grads_dev), flat(grads_bf16)
    assert torch.isfinite(g_dev).all() and torch.isfinite(g_bf16).all()
    assert g_bf16.abs().sum() > 0
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    assert cos(g_dev, g_cpu) > 0.999, cos(g_dev, g_cpu)
    assert cos(g_bf16, g_cpu) > 0.98, cos(g_bf16, g_cpu)


def _trainer_cfg(compile_: bool) -> dict:
    from hdit_train.run import DEFAULTS

    cfg = {k: dict(v) for k, v in DEFAULTS.items()}
    cfg["model"] = copy.deepcopy(HDIT_MODEL)
    cfg["data"]["size"] = 128
    cfg["train"].update(compile=compile_, bf16=True, warmup_steps=1, lr=1e-3, batch_size=4)
    return cfg


def _trainer_losses(compile_: bool, steps: int = 3) -> list[float]:
    """`hdit_train.train_loop.Trainer` steps on one batch: finite losses,
    weights and EMA, every weight moved."""
    from hdit_train.train_loop import Trainer

    g = torch.Generator().manual_seed(0)
    # 128x128 px -> 32x32 tokens: the strided (tile 8) path of na2d_torch
    batch = {"image": torch.rand(4, 3, 128, 128, generator=g) * 2 - 1}
    trainer = Trainer(_trainer_cfg(compile_), device=DEVICE)
    _randomize(trainer.model)
    trainer.ema.load_state_dict(trainer.model.state_dict())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    losses = [trainer.train_step(batch) for _ in range(steps)]
    _sync()
    assert np.isfinite(losses).all(), (compile_, losses)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.ema.parameters())
    changed = [
        n
        for n, p in trainer.model.named_parameters()
        if n in before and not torch.equal(p.detach(), before[n])
    ]
    assert len(changed) == len(before), set(before) - set(changed)
    return losses


def test_hdit_trainer_steps_on_device_eager():
    """`Trainer` with bf16 autocast (as on a GPU), without torch.compile."""
    _trainer_losses(False)


# ---- the encoders on the device -------------------------------------------------------------
def _fast(clip, **opts):
    """A copy of the CPU fp32 `clip` on the device under these settings (`Clip.variant`)."""
    return clip.variant(device=DEVICE, **opts)


def _encode(fast, images, tokens):
    img, txt = fast.encode_image_tensor(images), fast.encode_text_tokens(tokens)
    _sync()
    # Clip gives numpy (FastClip gave tensors)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    assert np.isfinite(img).all() and np.isfinite(txt).all()
    return img, txt


def test_fast_clip_precision_and_speed_options_on_device(clip_case):
    """`Clip`, the path the embed worker uses: bf16 weights and every speed
    option stay close to fp32."""
    from models.speed import bf16_supported

    name, _, clip, images, tokens = clip_case
    ref_img, ref_txt = _encode(_fast(clip, trim_text=False), images, tokens)
    torch.testing.assert_close(
        torch.from_numpy(ref_img).norm(dim=-1), torch.ones(len(images)), atol=1e-4, rtol=0
    )
    # the device's fp32 agrees with the CPU's fp32
    cpu = clip.variant(device="cpu", trim_text=False)
    cpu_img, cpu_txt = cpu.encode_image_tensor(images), cpu.encode_text_tokens(tokens)
    for what, a, b in (("image", ref_img, cpu_img), ("text", ref_txt, cpu_txt)):
        mean, low = _rows_cos(a, b)
        assert mean >= 0.999 and low >= 0.99, (name, what, "device fp32 vs cpu fp32", mean, low)
    cases = [
        ("trim_text", "fp32", {"trim_text": True}, 0.999),
        ("channels_last", "fp32", {"channels_last": True, "trim_text": False}, 0.999),
    ]
    if DEVICE.startswith("cuda") or bf16_supported(DEVICE):
        cases += [
            ("bf16", "bf16", {"trim_text": False}, 0.995),
            (
                "bf16+trim_text+channels_last",
                "bf16",
                {"trim_text": True, "channels_last": True},
                0.995,
            ),
        ]
    if DEVICE.startswith("cuda"):
        assert bf16_supported(DEVICE), "CUDA device without bf16 support"
    failures = []
    for label, precision, opts, floor in cases:
        fast = _fast(clip, precision=precision, **opts)
        if precision == "bf16" and DEVICE.startswith("cuda"):
            assert next(fast.model.parameters()).dtype == torch.bfloat16, label
        img, txt = _encode(fast, images, tokens)
        for what, a, b in (("image", img, ref_img), ("text", txt, ref_txt)):
            mean, low = _rows_cos(a, b)
            if mean < floor:
                failures.append((name, label, what, round(mean, 6), round(low, 6)))
    assert not failures, failures


def test_fast_clip_normalises_uint8_batches_on_device(clip_case):
    """The embed worker's GPU path: uint8 NHWC batches scaled on the device
    equal CPU-normalised ones."""
    from models.preprocess import batch_normalizer, normalize_batch

    name, spec, clip, images, _ = clip_case
    size, mean, std = batch_normalizer(clip.preprocess)
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(8)]
    fast = _fast(clip, trim_text=False)
    ref = fast.encode_image_tensor(normalize_batch(arrays, mean, std))
    # uint8: normalised by the Clip itself
    got = fast.encode_image_tensor(torch.from_numpy(np.stack(arrays)))
    _sync()
    mean_cos, low = _rows_cos(got, ref)
    assert low >= 0.99999, (name, mean_cos, low)


def test_clip_encoder_bf16_autocast_on_device(clip_case, samples):
    """`load_clip(..., precision='bf16')` (bf16 weights) vs fp32 on the device:
    images from PIL and captions."""
    from models.clip import load_clip

    name, spec, _, _, _ = clip_case
    fp32 = load_clip(spec, device=DEVICE)
    bf16 = load_clip(spec, device=DEVICE, precision="bf16")
    assert fp32.device == DEVICE
    pil = [s.image for s in samples]
    caps = [s.caption for s in samples]
    a_img, a_txt = fp32.encode_images(pil), fp32.encode_texts(caps)
    b_img, b_txt = bf16.encode_images(pil), bf16.encode_texts(caps)
    for what, a, b in (("image", a_img, b_img), ("text", a_txt, b_txt)):
        assert b.dtype == np.float32 and np.isfinite(b).all()
        np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1, atol=1e-3)
        mean, low = _rows_cos(a, b)
        assert mean >= 0.995, (name, what, "bf16 vs fp32", mean, low)
    if (
        name == "sieve-tiny"
    ):  # the trained model still tells matching captions from shuffled ones in bf16
        matched = np.einsum("ij,ij->i", b_img, b_txt).mean()
        shuffled = np.einsum("ij,ij->i", b_img, np.roll(b_txt, 7, axis=0)).mean()
        assert matched > shuffled + 0.05, (matched, shuffled)


# ---- the embed job on the default GPU cluster vs CPU -----------------------------------------
E2E_SAMPLES, E2E_SHARD = 600, 200  # 3 shards


@pytest.fixture(scope="module")
def e2e_shards(tmp_path_factory) -> Path:
    from pipelines.generate import write_sample_dataset

    root = tmp_path_factory.mktemp("gpu-shards")
    write_sample_dataset(
        root,
        E2E_SAMPLES,
        size=64,
        seed=7,
        watermark_fraction=0.1,
        corrupt_fraction=0.05,
        shard_size=E2E_SHARD,
    )
    return root


def _collection(out: Path):
    import pandas as pd

    from collection import schema as S

    layout = S.CollectionLayout(str(out))
    parts = sorted(int(p.stem) for p in (out / S.DONE_DIR).glob("*.json"))
    meta = pd.concat([pd.read_parquet(layout.metadata(i)) for i in parts], ignore_index=True)
    img = np.concatenate([np.load(layout.img_emb(i)) for i in parts]).astype(np.float32)
    txt = np.concatenate([np.load(layout.text_emb(i)) for i in parts]).astype(np.float32)
    stats = [json.loads((out / S.DONE_DIR / f"{i}.json").read_text()) for i in parts]
    return meta, img, txt, stats


@pytest.fixture(scope="module")
def cpu_collection(e2e_shards, tiny_ready, tmp_path_factory):
    from pipelines.embed import embed

    out = tmp_path_factory.mktemp("e2e-cpu") / "collection"
    summary = embed(str(e2e_shards), str(out), batch_size=64, device="cpu")
    return summary, _collection(out)


@pytest.mark.parametrize("precision,floor", [("fp32", 0.999), ("bf16", 0.99)])
def test_embed_job_on_default_gpu_cluster_matches_cpu(
    e2e_shards, cpu_collection, tmp_path, precision, floor
):
    from collection import schema as S
    from pipelines.embed import embed
    from pipelines.embed_cluster import default_cluster_size

    out = tmp_path / "collection"
    summary = embed(str(e2e_shards), str(out), batch_size=64, device=DEVICE, precision=precision)
    cpu_summary, (cpu_meta, cpu_img, cpu_txt, _) = cpu_collection
    meta, img, txt, stats = _collection(out)
    for key in ("count", "ok", "parts", "shards", "status_counts", "emb_dim"):
        assert summary[key] == cpu_summary[key], key
    assert summary["count"] == E2E_SAMPLES and summary["parts"] == E2E_SAMPLES // E2E_SHARD
    # corrupt samples were generated
    assert summary["status_counts"].get(S.STATUS_DECODE_ERROR, 0) > 0
    cols = [
        S.KEY,
        S.PART,
        S.ROW,
        S.STATUS,
        S.EMB_ROW,
        S.CAPTION,
        S.WIDTH,
        S.HEIGHT,
        S.SHA256,
        S.PHASH,
    ]
    assert meta[cols].equals(cpu_meta[cols])
    assert (
        img.shape
        == cpu_img.shape
        == txt.shape
        == cpu_txt.shape
        == (summary["ok"], summary["emb_dim"])
    )
    if DEVICE.startswith("cuda"):  # the default GPU cluster: a worker per 4 cores, sharing the GPU
        workers, threads = default_cluster_size(tasks=summary["shards"], gpu=True)
        assert len({s["worker"] for s in stats}) <= workers
        assert all(s["torch_threads"] == threads for s in stats)
        # a decode pool beside the GPU
        assert all(s["decode_threads"] == max(1, threads - 1) for s in stats)
        assert all(s["precision"] == precision for s in stats)
    for what, a, b in (("image", img, cpu_img), ("text", txt, cpu_txt)):
        mean, low = _rows_cos(a, b)
        assert mean >= floor, (precision, what, mean, low)
    ok = meta[S.STATUS] == S.STATUS_OK
    diff = np.abs(
        meta.loc[ok, S.CLIP_SIMILARITY].to_numpy() - cpu_meta.loc[ok, S.CLIP_SIMILARITY].to_numpy()
    )
    assert diff.max() < (0.01 if precision == "fp32" else 0.05), diff.max()


# ---- FAISS on the GPU -------------------------------------------------------------------------
def test_faiss_gpu_flat_search_matches_cpu():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() < 1:
        pytest.skip("faiss has no GPU support here")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((20_000, 512)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[rng.choice(len(base), 64, replace=False)] + 0.01 * rng.standard_normal(
        (64, 512)
    ).astype(np.float32)
    cpu = faiss.IndexFlatIP(512)
    cpu.add(base)
    gpu = faiss.index_cpu_to_all_gpus(cpu)
    d_cpu, i_cpu = cpu.search(queries, 10)
    d_gpu, i_gpu = gpu.search(queries, 10)
    np.testing.assert_allclose(d_gpu, d_cpu, atol=1e-4)
    assert (i_gpu[:, 0] == i_cpu[:, 0]).all()
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_gpu, i_cpu)]) > 0.99


# ---- last: torch.compile (slowest: compiles on first call) -----------------------------------
@pytest.mark.parametrize("name", ["sieve-tiny", VITB32])
def test_fast_clip_compile_on_device(name, samples, request):
    """torch.compile of the image tower (one fixed batch shape) gives the eager fp32 embeddings."""
    _need_compiler()
    if name == "sieve-tiny":
        request.getfixturevalue("tiny_ready")
        spec = "sieve-tiny"
    else:
        spec = request.getfixturevalue("vitb32_ckpt")
    clip, images, tokens = _model_inputs(spec, samples)
    ref_img, _ = _encode(_fast(clip, trim_text=False), images, tokens)
    fast = _fast(clip, compile=True, trim_text=False)
    img = fast.encode_image_tensor(images)  # compiles here
    img = fast.encode_image_tensor(images)  # and runs compiled
    _sync()
    mean, low = _rows_cos(img, ref_img)
    assert mean >= 0.999, (name, "compile", mean, low)


def test_hdit_trainer_compiled_matches_eager():
    """`Trainer` as `hdit_train.train` runs it on a GPU (bf16 autocast + torch.compile): finite,
    every weight updated, and the compiled first step's loss equals the eager one's."""
    if not DEVICE.startswith("cuda"):
        pytest.skip("Trainer compiles on CUDA only")
    _need_compiler()
    eager = _trainer_losses(False, steps=1)
    compiled = _trainer_losses(True, steps=2)
    assert abs(compiled[0] - eager[0]) <= 3e-2 * abs(eager[0]), (eager, compiled)
