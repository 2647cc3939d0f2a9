"""Analysis tools that read trained models: the reward probe (:mod:`.reward_probe`)."""
