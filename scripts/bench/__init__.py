"""Benchmark harness: fnbp's hand-written and autodiff train steps beside Flax + Optax and PyTorch.

One run measures, on whatever device JAX has (a benchmark, not a test: nothing here asserts):

* train-step time (median of interleaved timed repeats after warm-up, ``block_until_ready``)
  of the same ReLU MLP, batch and optimizer (SGD, momentum 0.9) by fnbp ``grads="manual"``,
  fnbp ``grads="autodiff"``, a Flax Linen ``Dense`` stack with Optax, and PyTorch
  (``nn.Sequential`` + ``torch.optim.SGD``, eager and ``torch.compile``) when it is installed;
  model FLOP/s (6 · weights · batch per step) and its fraction of a matmul ceiling measured in
  the same run (the best of a few large square XLA matmuls of the same dtype);
* the same for nets beyond the MLP (the digits CNN, the MNIST-1D CNN, a residual MLP with
  BatchNorm): the hand-written step against the ``jax.grad`` step of the same forward and a
  Flax peer; beside each manual/Flax ratio (both sections) an A/A control, the hand-written
  step over itself built and compiled a second time, timed in the same rounds (what noise
  alone does);
* sweep throughput of 64 small models on digits: a Python loop of jitted steps, a scan-fused
  epoch per model, and the vmapped population + scan;
* per-example gradients: hand-written (``fnbp.per_example_grads``) vs ``vmap(jax.grad)``;
* DP-SGD's clipped, noised gradient from one backward pass (``fnbp.dp_grads``'s program) vs
  vmap-and-clip and a plain gradient, time and compiled peak memory at batch 256–4096, and
  Opacus where it is installed (:mod:`bench.privacy`);
* the cost of ``fnbp.crosscheck`` with finite differences (784-16-16-10 and the MNIST-1D CNN,
  batch 32, float64, each in a fresh process so compilation is included) beside
  ``torch.autograd.gradcheck``;
* peak memory of the compiled manual and autodiff steps (XLA's memory analysis).

Configs: small 64-128-128-10 (batch 32, 128), medium 784-1024-1024-10 (batch 256, 4096) and,
on a GPU only, large 4096×4 hidden-10 (batch 8192). dtypes: float32 everywhere, bfloat16
(fnbp ``compute_dtype``, Flax ``dtype``, torch autocast; float32 master params) on a GPU, and
on a CPU in ``--quick`` so the code path runs. On a GPU torch float32 matmuls use TF32, as
XLA's default precision does.

Usage::

    .venv/bin/python scripts/bench.py                  # the full run (~8 min on a 2-core CPU)
    .venv/bin/python scripts/bench.py --quick          # every section at toy sizes, for tests
    .venv/bin/python scripts/bench.py --configs small --no-torch

Writes ``benchmarks/<device-kind>.json`` and ``.md`` (``<device-kind>-quick.*`` in quick mode).

One module per section: :mod:`bench.common` (configs, timer, interleaved rounds, paired
ratios), :mod:`bench.ceiling` (matmul ceiling), :mod:`bench.train_steps` (MLP steps),
:mod:`bench.nets` (steps of nets), :mod:`bench.sweep`, :mod:`bench.per_example`,
:mod:`bench.crosscheck`, :mod:`bench.torch_peer` (PyTorch, in its own process),
:mod:`bench.targets` (targets and closing notes), :mod:`bench.report` (the markdown) and
:mod:`bench.main` (the command line); ``scripts/bench.py`` runs :func:`bench.main.main`.
"""
