"""What XLA built: counts of custom calls, fusions and library calls in a compiled program.

    python -m experiments.hlo_report --config sd15 --kernels auto --dtype float16

Lowers and compiles one UNet step (batch 2, guidance layout) and reports, from the optimized
HLO, how many of our Pallas kernels (custom calls named `sdjax_*`), cuDNN and cuBLAS calls
and XLA fusions run per step. Our kernels must each appear as a custom call: the run fails
if an implementation was chosen whose kernel is missing from the HLO.
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "sd15", "architecture preset")
flags.DEFINE_string("kernels", "auto", "op implementation preset")
flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"], "compute dtype")
flags.DEFINE_integer("latent", 64, "latent side (64 for 512x512)")
flags.DEFINE_string("dump", None, "write the optimized HLO text to this file")


def main(argv):
    del argv
    import jax.numpy as jnp

    from sdjax import config as sd_config
    from sdjax import ops
    from sdjax.hlo import count_hlo, expected_kernels, unet_step_hlo

    kernels = ops.Implementations.preset(FLAGS.kernels)
    text = unet_step_hlo(
        sd_config.preset(FLAGS.config), kernels, jnp.dtype(FLAGS.dtype), FLAGS.latent
    )
    if FLAGS.dump:
        with open(FLAGS.dump, "w") as f:
            f.write(text)
    counts = count_hlo(text)
    print(counts)
    missing = [
        k
        for k in expected_kernels(kernels)
        if not any(n.startswith(k) for n in counts["sdjax_kernels"])
    ]
    if missing:
        print(f"error: chosen kernels missing from the HLO: {missing}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
