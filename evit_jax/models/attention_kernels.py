"""Global-context kernels for the EfficientViT block, selectable by name, and the attention spec parser.

A kernel is ONE small pure function plus ONE registry entry:

    def my_kernel(q, k, v, *, eps: float, **options) -> out

q, k, v and out have shape (B, N, heads, dim) and dtype float32 (N = H*W tokens in raster order);
`eps` is the model's attention epsilon (official 1e-15, timm 1e-5), used to guard a normaliser; every
other keyword is an option with a default, settable from `create_model(..., attention_options={...})`
or from the attention spec string (`"focused(power=2)"`). The caller (`LiteMLA`) owns every learned
parameter (qkv projection, multi-scale aggregation, output projection, FLatten's value DWC), so all
kernels share the same parameter tree and official weights load into any of them.

Products and normalisers run in float32 with HIGHEST matmul precision whatever the compute dtype:
linear-attention denominators lose all precision in bfloat16 (official issues #15 and #110).

Spec strings (what `config.model.attention` holds): `name` or `name(key=value, ...)` with Python
literal values, e.g. `"relu_linear"`, `"softmax(scales=())"`, `"focused(power=3, value_dwc=0)"`,
`"relu_linear(scales=(3, 5))"`. Besides the kernel's own options, two module options are understood:
`scales` (multi-scale aggregation kernel sizes; default: the architecture's own, (5,) for B models)
and `value_dwc` (kernel size of a depthwise conv on V added to the output, FLatten's DWC; 0 = none).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST

# Signature of a global-context kernel: q, k, v of shape (B, N, heads, dim) in float32 -> (B, N, heads, dim).
AttentionFn = Callable[..., jax.Array]

# Options that configure LiteMLA itself rather than the kernel function.
MODULE_OPTIONS = ("scales", "value_dwc")
ALLOWED_SCALES = (1, 3, 5, 7)


def _normalised_linear(phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, eps: float) -> jax.Array:
    """sum_j (phi_q_i . phi_k_j) v_j / (sum_j phi_q_i . phi_k_j + eps) in O(N): keys first, then queries."""
    kv = jnp.einsum("bnhd,bnhe->bhde", phi_k, v, precision=HIGHEST)
    numerator = jnp.einsum("bnhd,bhde->bnhe", phi_q, kv, precision=HIGHEST)
    k_sum = jnp.sum(phi_k, axis=1)
    denominator = jnp.einsum("bnhd,bhd->bnh", phi_q, k_sum, precision=HIGHEST)[..., None]
    return numerator / (denominator + eps)


def relu_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float) -> jax.Array:
    """ReLU linear attention, the official `relu_linear_att` of EfficientViT (Cai et al., ICCV 2023).

    out_i = sum_j (relu(k_j) . relu(q_i)) v_j / (sum_j relu(k_j) . relu(q_i) + eps), O(N) cost. The
    denominator comes, as in the official code, from a row of ones appended to v, so one pair of matmuls
    yields numerator and denominator (this exact op order is what the default model is frozen to).
    """
    q, k = jax.nn.relu(q), jax.nn.relu(k)
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    vk = jnp.einsum("bnhe,bnhd->bhed", v, k, precision=HIGHEST)
    out = jnp.einsum("bhed,bnhd->bnhe", vk, q, precision=HIGHEST)
    # A split, not out[..., :-1]: under a symbolic batch (exports) indexing lowers to a gather TFLite rejects.
    numerator, denominator = jnp.split(out, [out.shape[-1] - 1], axis=-1)
    return numerator / (denominator + eps)


def relu_quadratic_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float) -> jax.Array:
    """Official `relu_quadratic_att`, used when H*W <= dim: the N x N map, normalised over keys."""
    q, k = jax.nn.relu(q), jax.nn.relu(k)
    att = jnp.einsum("bkhd,bqhd->bhkq", k, q, precision=HIGHEST)
    att = att / (jnp.sum(att, axis=2, keepdims=True) + eps)
    return jnp.einsum("bkhe,bhkq->bqhe", v, att, precision=HIGHEST)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float) -> jax.Array:
    """Standard multi-head softmax attention over all N positions (Vaswani et al., 2017), O(N^2) cost.

    out_i = sum_j softmax_j(q_i . k_j / sqrt(dim)) v_j. `eps` is unused: the softmax normaliser is >= 1
    after the max subtraction. Memory grows as B * heads * N^2 * 4 bytes.
    """
    del eps
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k, precision=HIGHEST)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhe->bqhe", weights, v, precision=HIGHEST)


def elu_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float) -> jax.Array:
    """Linear attention with feature map phi(x) = elu(x) + 1 (Katharopoulos et al., ICML 2020,
    "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention"), non-causal, O(N).

    phi is strictly positive, so the denominator never vanishes; eps only guards float rounding.
    """
    phi = lambda x: jax.nn.elu(x) + 1.0  # noqa: E731
    return _normalised_linear(phi(q), phi(k), v, eps)


def focused_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float, power: float = 3.0,
                             kernel_eps: float = 1e-6) -> jax.Array:
    """Focused linear attention (Han et al., ICCV 2023, "FLatten Transformer: Vision Transformer using
    Focused Linear Attention"), O(N).

    phi_p(x) = f_p(relu(x) + kernel_eps) with the focusing function f_p(x) = ||x|| / ||x^p|| * x^p (x^p
    elementwise): the direction sharpens towards the dominant channels while the norm is kept.
    `power` is the paper's focusing factor p (3 in its models). The paper's learnable per-channel
    softplus scale is not modelled (it would be a new parameter); its depthwise conv on V ("DWC", kernel
    5) is the module option `value_dwc`, on by default for this kernel (`value_dwc=0` removes it).
    """
    def focus(x: jax.Array) -> jax.Array:
        x = jax.nn.relu(x) + kernel_eps
        xp = x ** power
        norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
        return xp * (norm / jnp.linalg.norm(xp, axis=-1, keepdims=True))

    return _normalised_linear(focus(q), focus(k), v, eps)


def cosformer_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float) -> jax.Array:
    """cosFormer (Qin et al., ICLR 2022, "cosFormer: Rethinking Softmax in Attention"), non-causal, O(N).

    Weight of key j for query i: relu(q_i) . relu(k_j) * cos(pi/2 * (i - j) / M), with i, j the raster
    positions of the H*W tokens and M = N (the paper's M is the sequence length; |i - j| < M keeps every
    weight >= 0). cos(a - b) = cos a cos b + sin a sin b splits it into two linear attentions that share
    one denominator.
    """
    n = q.shape[1]
    angle = (jnp.pi / 2.0) * jnp.arange(n, dtype=jnp.float32) / n
    cos, sin = jnp.cos(angle)[None, :, None, None], jnp.sin(angle)[None, :, None, None]
    q, k = jax.nn.relu(q), jax.nn.relu(k)
    qc, qs, kc, ks = q * cos, q * sin, k * cos, k * sin
    numerator = (jnp.einsum("bnhd,bhde->bnhe", qc, jnp.einsum("bnhd,bnhe->bhde", kc, v, precision=HIGHEST),
                            precision=HIGHEST)
                 + jnp.einsum("bnhd,bhde->bnhe", qs, jnp.einsum("bnhd,bnhe->bhde", ks, v, precision=HIGHEST),
                              precision=HIGHEST))
    denominator = (jnp.einsum("bnhd,bhd->bnh", qc, jnp.sum(kc, axis=1), precision=HIGHEST)
                   + jnp.einsum("bnhd,bhd->bnh", qs, jnp.sum(ks, axis=1), precision=HIGHEST))[..., None]
    return numerator / (denominator + eps)


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    """A registered kernel. `cost` is "linear" or "quadratic" in N (documentation and sweep reports);
    `module_defaults` are default module options for this kernel (e.g. FLatten's value DWC)."""

    fn: AttentionFn
    cost: str
    module_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


ATTENTION_KERNELS: dict[str, KernelEntry] = {
    "relu_linear": KernelEntry(relu_linear_attention, "linear"),
    "softmax": KernelEntry(softmax_attention, "quadratic"),
    "elu_linear": KernelEntry(elu_linear_attention, "linear"),
    "focused": KernelEntry(focused_linear_attention, "linear", {"value_dwc": 5}),
    "cosformer": KernelEntry(cosformer_attention, "linear"),
}


def list_attention_kernels() -> list[str]:
    return sorted(ATTENTION_KERNELS)


def get_attention_kernel(name: str) -> AttentionFn:
    """The kernel function registered under `name` (ValueError listing the names otherwise)."""
    return _entry(name).fn


def _entry(name: str) -> KernelEntry:
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention {name!r}; available: {', '.join(list_attention_kernels())}")
    return ATTENTION_KERNELS[name]


def _kernel_option_names(fn: AttentionFn) -> tuple[str, ...]:
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "eps")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """A parsed, validated attention choice. Hashable, so it can sit in a Flax module attribute."""

    name: str
    kernel_options: tuple[tuple[str, Any], ...] = ()
    scales: tuple[int, ...] | None = None  # None: the architecture's own scales
    value_dwc: int = 0

    @property
    def fn(self) -> Callable[..., jax.Array]:
        return functools.partial(ATTENTION_KERNELS[self.name].fn, **dict(self.kernel_options))

    @property
    def cost(self) -> str:
        return ATTENTION_KERNELS[self.name].cost

    def to_string(self) -> str:
        """Canonical spec string; `parse_attention(spec.to_string()) == spec`."""
        options = list(self.kernel_options)
        if self.scales is not None:
            options.append(("scales", self.scales))
        if self.value_dwc != ATTENTION_KERNELS[self.name].module_defaults.get("value_dwc", 0):
            options.append(("value_dwc", self.value_dwc))
        if not options:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={v!r}" for k, v in sorted(options)) + ")"


def _split_spec_string(text: str) -> tuple[str, dict[str, Any]]:
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        node = None
    if isinstance(node, ast.Name):
        return node.id, {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        try:
            return node.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except ValueError:
            pass
    raise ValueError(f"attention spec {text!r} is not `name` or `name(key=literal, ...)`, "
                     "e.g. 'relu_linear' or 'focused(power=2, scales=(3, 5))'")


def _check_scales(scales: Any) -> tuple[int, ...]:
    if isinstance(scales, int):
        scales = (scales,)
    if not isinstance(scales, (tuple, list)) or any(not isinstance(s, int) or s not in ALLOWED_SCALES for s in scales):
        raise ValueError(f"attention scales must be a tuple of kernel sizes from {ALLOWED_SCALES}, got {scales!r}")
    return tuple(scales)


@functools.lru_cache(maxsize=None)
def _parse_cached(text: str, options: tuple[tuple[str, Any], ...]) -> AttentionSpec:
    name, inline = _split_spec_string(text)
    entry = _entry(name)
    explicit = dict(options)
    clash = sorted(set(inline) & set(explicit))
    if clash:
        raise ValueError(f"attention option(s) {clash} given both in the spec {text!r} and in attention_options")
    merged = {**entry.module_defaults, **inline, **explicit}
    allowed = _kernel_option_names(entry.fn)
    unknown = sorted(set(merged) - set(allowed) - set(MODULE_OPTIONS))
    if unknown:
        raise ValueError(f"attention {name!r} has no option(s) {unknown}; its options: "
                         f"{sorted(set(allowed) | set(MODULE_OPTIONS))}")
    scales = _check_scales(merged.pop("scales")) if "scales" in merged else None
    value_dwc = merged.pop("value_dwc", 0)
    if not isinstance(value_dwc, int) or value_dwc < 0 or (value_dwc and value_dwc % 2 == 0):
        raise ValueError(f"value_dwc must be 0 (off) or an odd kernel size, got {value_dwc!r}")
    return AttentionSpec(name, tuple(sorted(merged.items())), scales, value_dwc)


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def parse_attention(spec: str | AttentionSpec, options: Mapping[str, Any] | None = None) -> AttentionSpec:
    """Parse and validate an attention choice: a spec string (see module doc) plus optional extra options.

    Raises one ValueError naming the problem (unknown kernel, unknown option, bad scales) before any work.
    """
    if isinstance(spec, AttentionSpec):
        if not options:
            return spec
        spec = spec.to_string()
    if not isinstance(spec, str):
        raise ValueError(f"attention must be a string such as 'relu_linear', got {spec!r}")
    frozen = tuple(sorted((str(k), _freeze(v)) for k, v in (options or {}).items()))
    return _parse_cached(spec, frozen)


def attention_spec_string(attention: str, options: Mapping[str, Any] | None = None,
                          scales: tuple[int, ...] | None = None) -> str:
    """Canonical spec string for `create_model(attention=..., attention_options=..., scales=...)`.

    The default stays the plain name "relu_linear", so default models are unchanged.
    """
    merged = dict(options or {})
    if scales is not None:
        if "scales" in merged:
            raise ValueError("give scales either as create_model(scales=...) or in attention_options, not both")
        merged["scales"] = tuple(scales)
    return parse_attention(attention, merged).to_string()


def split_attention_specs(text: str) -> list[str]:
    """'relu_linear,focused(power=2, value_dwc=0)' -> ['relu_linear', 'focused(power=2, value_dwc=0)']:
    commas inside parentheses belong to a spec."""
    parts, depth, current = [], 0, []
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]
