"""Optimizers and learning-rate schedules, chosen by name in `trainer.optimizer` and
`trainer.lr_scheduler`."""
