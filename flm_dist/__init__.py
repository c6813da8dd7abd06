"""flm_dist: distributed pretraining and fine-tuning of FLM recommenders on Ray."""

__version__ = "0.1.0"
