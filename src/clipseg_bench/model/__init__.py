"""The CLIPSeg model: loading (:mod:`.load`), our forward (:mod:`.forward`), trained-weight files
(:mod:`.checkpoint`) and the tiny model's tokenizer (:mod:`.tokenizer`).

Nothing is imported here, so that importing one submodule does not pull in transformers.
"""
