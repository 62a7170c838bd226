"""The measurements of ``benchmarks/throughput.py``, one module per thing measured.

- :mod:`.plans`: how much each architecture is measured (``--quick``, full, the tests' smoke);
- :mod:`.common`: the random models and their prompts, the phantom dataset, timing side by side, table rows;
- :mod:`.engine`: our engine, the training loop's own step on the setup ``train()`` builds;
- :mod:`.steps`: per strategy, the step time of the per-pair baseline against the engine (stock per-pair
  vs cached decoder for decoder-only, per-pair vs shared encoding for the others);
- :mod:`.step_options`: gradient checkpointing and ``torch.compile`` on the engine step;
- :mod:`.segment`: segmenting a volume for the 13 organs, stock per pair vs ``Segmenter``;
- :mod:`.truncation`: the vision encoder with and without the layers the decoder never reads;
- :mod:`.memory`: the peak-RSS probe, in a process of its own;
- :mod:`.report`: the targets, the headline ratios and the printed tables.

``benchmarks/`` is not a package: ``throughput.py`` puts its own folder on ``sys.path`` and imports
this package from there.
"""
