"""cl_arch.train: data pipelines, pretraining, meta-training and fine-tuning loops."""
