# Run from a checkout of commit 827a72c (code before the attention refactor): PYTHONPATH=. python tests/data/record_attention_reference.py
# conv_impl="lax" keeps the reference independent of the CPU fast-path formulations in ops.py.
# Records reference outputs of the DEFAULT models from the code at commit 827a72c (before the attention refactor).
import time, numpy as np, jax, jax.numpy as jnp
from evit_jax.models import create_model
import sys
sys.path.insert(0, "tests")
from _reference_weights import seeded_variables
out = {}
cases = [("efficientvit_b0", 160, 2), ("efficientvit_b0", 64, 2), ("efficientvit_backbone_l0", 224, 1)]
for name, res, b in cases:
    t = time.time()
    m = create_model(name, conv_impl="lax")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((b, res, res, 3), np.float32))
    v = seeded_variables(m, x.shape, seed=0)
    y = jax.jit(lambda v, x: m.apply(v, x, train=False))(v, x)
    if isinstance(y, dict): y = y["stage_final"]
    out[f"{name}_{res}"] = np.asarray(y)
    print(name, res, y.shape, float(jnp.abs(y).mean()), float(jnp.abs(y).max()), time.time() - t)
np.savez("tests/data/attention_default_reference.npz", **out)
