"""Train-step throughput: evit_jax (jit, AdamW + clip + EMA, as the loop) vs timm (PyTorch).

    python -m evit_jax.tools.train_bench --model efficientvit_b1 --batch 16 --res 224 --compare-timm

Random data, one device; float32 or --dtype bfloat16 compute. With a GPU, timm runs on it too.
Prints images/s; nothing is asserted (not a test).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax


def torch_device() -> str:
    """Where the PyTorch reference runs: the GPU when JAX runs on one and torch sees it, else the CPU,
    so that a --compare-timm ratio always compares the two frameworks on the same hardware."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _timed(step: Callable[[], None], steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def benchmark_train_step(model_name: str = "efficientvit_b1", batch: int = 16, res: int = 224, *,
                         steps: int = 5, warmup: int = 2, conv_impl: str = "auto",
                         dtype: str = "float32") -> dict:
    """images/s of evit_jax's full train step (forward, backward, clip-by-value, AdamW with
    the weight-decay mask, EMA update; BN statistics) on random data; plus compile time."""
    from evit_jax.models import create_model, get_model_spec
    from evit_jax.tasks.classification import classification_loss
    from evit_jax.train import optim

    model = create_model(model_name, dtype=jnp.dtype(dtype), conv_impl=conv_impl)
    variables = model.init(jax.random.key(0), jnp.zeros((1, res, res, 3)), train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    ocfg = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
                                          no_decay_keys=("norm", "bias"), grad_clip_value=2.0))
    tx = optim.create_optimizer(ocfg, optim.warmup_cosine_schedule(1e-3, 10, 1000), params)
    num_classes = get_model_spec(model_name).num_classes or 1000  # backbone-only models: any head size

    def step(carry, x, y):
        params, batch_stats, opt_state, ema, t = carry

        def loss_fn(p):
            logits, mutated = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                          mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
            return classification_loss(logits, jax.nn.one_hot(y, num_classes), bce=True), mutated["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = optim.ema_update(ema, params, optim.ema_decay(t + 1, 0.9998, 2000.0))
        return (params, batch_stats, opt_state, ema, t + 1), loss

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, res, res, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, num_classes, size=(batch,)))
    carry = (params, batch_stats, tx.init(params), jax.tree_util.tree_map(jnp.copy, params), jnp.zeros((), jnp.int32))
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(carry, x, y).compile()
    compile_s = time.perf_counter() - t0
    box = [carry]

    def run():
        box[0], loss = compiled(box[0], x, y)
        loss.block_until_ready()

    seconds = _timed(run, steps, warmup)
    return {"framework": "evit_jax", "model": model_name, "batch": batch, "res": res,
            "images_per_s": steps * batch / seconds, "step_ms": 1000 * seconds / steps,
            "compile_s": compile_s, "backend": jax.default_backend(), "dtype": dtype}


def benchmark_timm_train_step(model_name: str = "efficientvit_b1", batch: int = 16, res: int = 224, *,
                              steps: int = 5, warmup: int = 2, threads: int | None = None,
                              dtype: str = "float32") -> dict:
    """images/s of timm's model with a plain PyTorch train step (AdamW, clip-by-value), channels_last,
    on the GPU when JAX runs on one (:func:`torch_device`), else the CPU; bfloat16 = autocast."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import timm
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    device = torch_device()
    model = timm.create_model(model_name, pretrained=False).train().to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g).to(device, memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(x)
        loss = loss_fn(logits.float(), torch.nn.functional.one_hot(y, 1000).float())
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 2.0)
        opt.step()
        synchronize(device)

    seconds = _timed(run, steps, warmup)
    return {"framework": f"timm {timm.__version__} / torch {torch.__version__}", "model": model_name,
            "batch": batch, "res": res, "images_per_s": steps * batch / seconds,
            "step_ms": 1000 * seconds / steps, "threads": torch.get_num_threads(), "device": device,
            "dtype": dtype}


def _format(r: dict) -> str:
    extra = f", compile {r['compile_s']:.1f}s" if "compile_s" in r else ""
    return (f"{r['framework']:<34} {r['model']} batch {r['batch']} @{r['res']}px {r['dtype']}: "
            f"{r['images_per_s']:.1f} images/s ({r['step_ms']:.0f} ms/step{extra})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientvit_b1")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--conv-impl", default="auto")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (params and optimizer state stay float32)")
    parser.add_argument("--compare-timm", action="store_true")
    args = parser.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPU cores, {jax.default_backend()} backend "
          f"({jax.devices()[0].device_kind}), jax {jax.__version__}", flush=True)
    print(_format(benchmark_train_step(args.model, args.batch, args.res, steps=args.steps,
                                       warmup=args.warmup, conv_impl=args.conv_impl, dtype=args.dtype)), flush=True)
    if args.compare_timm:
        r = benchmark_timm_train_step(args.model, args.batch, args.res, steps=args.steps,
                                      warmup=args.warmup, dtype=args.dtype)
        print(_format(r) + f" on {r['device']}", flush=True)


if __name__ == "__main__":
    main()
