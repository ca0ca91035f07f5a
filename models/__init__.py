"""PyTorch encoders, training, evaluation and the MLflow registry helpers."""
