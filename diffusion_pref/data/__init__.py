"""Preference-pair data: readers (:mod:`.pairs`), paired augmentation (:mod:`.augment`), batching
(:mod:`.loader`) and the latent/text-embedding cache (:mod:`.cache`, ``diffusion-pref cache``)."""
