"""Working without a whole second model in memory: the evaluation's reference recorded before a
pass changes the model (``reference``)."""
