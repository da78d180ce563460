"""Text-classification tasks for encoders: data and splits (``data``), dense fine-tuning
(``finetune``), and accuracy / macro-F1 / confusion of dense, oracle and SEA (``metrics``)."""

from .data import BUNDLED_TASKS, TaskBatches, TaskColumns, TaskData, check_task, encode, load_task

__all__ = ["BUNDLED_TASKS", "TaskBatches", "TaskColumns", "TaskData", "check_task", "encode", "load_task"]
