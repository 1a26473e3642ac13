"""Training: one loop (:mod:`.loop`) used by training from scratch (:mod:`.train`) and by
cluster-preserving fine-tuning (:mod:`.finetune`, with the tied modules of :mod:`.tied`)."""
