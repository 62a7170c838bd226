"""The data stage: read and validate CT volumes, make phantoms, prepare slices, load them for training.

- :mod:`~clipseg_bench.data.io`: read NIfTI volumes and labels with nibabel, and validate them.
- :mod:`~clipseg_bench.data.volumes`: volume <-> axial slices (exactly invertible), intensity windows.
- :mod:`~clipseg_bench.data.phantom`: synthetic abdominal CT with all 13 organs (the built-in data).
- :mod:`~clipseg_bench.data.prepare`: the `prepare` stage that writes a PREPARED folder.
- :mod:`~clipseg_bench.data.dataset`: reading a PREPARED folder for training (torch).

Nothing is imported here, so `prepare` and `phantom` do not pay for importing torch.
"""
