"""Model pools: a pretrained model and named fine-tuned experts, from hub ids or local directories."""
