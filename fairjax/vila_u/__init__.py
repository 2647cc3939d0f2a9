"""VILA-U: generation (:mod:`.generate`), preference / SFT datasets (:mod:`.data`), the token log-probs the
losses train on (:mod:`.logprobs`), image augmentation (:mod:`.augment`) and tiny random models (:mod:`.tiny`).
The network itself is :mod:`fairjax.models.vila_u`; conversion is :mod:`fairjax.convert.vila_u`."""
