"""The training loop shared by origin training and model finetuning."""
